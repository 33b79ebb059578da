"""Recurrent classifier modules."""
