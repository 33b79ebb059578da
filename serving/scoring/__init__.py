"""`rnnserve score`: batch scoring of files in-process, against a server, or on Ray."""
