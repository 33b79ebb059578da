// Command loadgen drives N concurrent real-time keyword streams against an rnnserve server
// (typed RnnServe.Stream, or KServe v2 sequences over ModelStreamInfer or over unary ModelInfer
// calls) and writes a JSON summary: response latencies, detection latencies, whether every
// stream kept pace, and the detections (or running labels) of every stream.
//
//	loadgen -target 127.0.0.1:50051 -manifest recordings/manifest.json -streams 100
//	loadgen -target 127.0.0.1:50051 -manifest recordings/manifest.json -mode kserve -streams 100
//	loadgen -target 127.0.0.1:50051 -manifest recordings/manifest.json -mode kserve-unary -streams 100
//	loadgen -target 127.0.0.1:50051 -manifest recordings/manifest.json -alone   # the reference
//
// Stream s plays recording s % R of the manifest once, in chunk_ms chunks sent at real-time
// pace; streams start spread over one chunk period, as independent clients would. With -alone
// every recording is streamed by itself, one after the other, without pacing: the detections
// a loaded stream must reproduce.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"time"

	"google.golang.org/grpc"
)

// Options are the command-line flags.
type Options struct {
	Target        string
	ManifestPath  string
	Mode          string
	Model         string
	Streams       int
	Connections   int
	ChunkMs       int
	ReportEveryMs int
	Alone         bool
	TimeoutS      float64
	Output        string
	CPUProfile    string
	StartGroups   int
}

func parseOptions() Options {
	var o Options
	flag.StringVar(&o.Target, "target", "127.0.0.1:50051", "server HOST:PORT (plaintext)")
	flag.StringVar(&o.ManifestPath, "manifest", "", "JSON manifest of the recordings and their keywords")
	flag.StringVar(&o.Mode, "mode", "typed", "typed (RnnServe.Stream), kserve (sequences over ModelStreamInfer) or kserve-unary (sequences over unary ModelInfer)")
	flag.StringVar(&o.Model, "model", "keywords", "model name")
	flag.IntVar(&o.Streams, "streams", 1, "concurrent streams")
	flag.IntVar(&o.Connections, "connections", 0, "gRPC connections the streams share (0: one per stream)")
	flag.IntVar(&o.ChunkMs, "chunk-ms", 100, "audio per chunk, in milliseconds")
	flag.IntVar(&o.ReportEveryMs, "report-every-ms", 0, "typed mode: StreamConfig.report_every_ms (0: a response per chunk)")
	flag.BoolVar(&o.Alone, "alone", false, "stream each recording alone, one after the other, unpaced (the reference)")
	flag.Float64Var(&o.TimeoutS, "timeout-s", 0, "give up after this long (0: the longest recording + 60 s)")
	flag.StringVar(&o.Output, "output", "-", "where the JSON summary goes (-: standard output)")
	flag.IntVar(&o.StartGroups, "start-groups", 0, "streams start in this many groups spread over one chunk period, "+
		"so a group's chunks share writes on a shared connection (0: every stream its own start)")
	flag.StringVar(&o.CPUProfile, "cpuprofile", "", "write the client's own CPU profile here (go tool pprof)")
	flag.Parse()
	return o
}

func main() {
	options := parseOptions()
	if err := run(options); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
}

func run(o Options) error {
	if o.ManifestPath == "" {
		return fmt.Errorf("-manifest is required")
	}
	if o.Mode != "typed" && o.Mode != "kserve" && o.Mode != "kserve-unary" {
		return fmt.Errorf("-mode %q: typed, kserve or kserve-unary", o.Mode)
	}
	if o.Streams < 1 || o.ChunkMs < 1 || o.Connections < 0 {
		return fmt.Errorf("-streams and -chunk-ms must be positive, -connections not negative")
	}
	recordings, err := loadManifest(o.ManifestPath, o.ChunkMs)
	if err != nil {
		return err
	}
	timeout := time.Duration(o.TimeoutS * float64(time.Second))
	if timeout <= 0 {
		var longest time.Duration
		for _, r := range recordings {
			if r.Duration > longest {
				longest = r.Duration
			}
		}
		timeout = time.Duration(len(recordings))*longest + 60*time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if o.CPUProfile != "" {
		out, err := os.Create(o.CPUProfile)
		if err != nil {
			return err
		}
		defer out.Close()
		if err := pprof.StartCPUProfile(out); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	started := time.Now()
	var results []*StreamResult
	if o.Alone {
		conns, err := dial(ctx, o.Target, 1)
		if err != nil {
			return err
		}
		defer closeAll(conns)
		for index := range recordings {
			plan := []streamPlan{{stream: index, recording: &recordings[index]}}
			results = append(results, runStreams(ctx, o, conns, plan, false)...)
		}
	} else {
		connections := o.Connections
		if connections == 0 || connections > o.Streams {
			connections = o.Streams
		}
		conns, err := dial(ctx, o.Target, connections)
		if err != nil {
			return err
		}
		defer closeAll(conns)
		plan := make([]streamPlan, o.Streams)
		for s := range plan {
			plan[s] = streamPlan{stream: s, recording: &recordings[s%len(recordings)]}
		}
		results = runStreams(ctx, o, conns, plan, true)
	}
	summary := summarize(o, recordings, results, time.Since(started))
	return writeJSON(o.Output, summary)
}

// dial opens n plaintext connections, each ready before any stream starts, so connection set-up
// is not measured.
func dial(ctx context.Context, target string, n int) ([]*grpc.ClientConn, error) {
	conns := make([]*grpc.ClientConn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range conns {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			dialCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			conns[i], errs[i] = grpc.DialContext(dialCtx, target, grpc.WithInsecure(), grpc.WithBlock())
		}(i)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			closeAll(conns)
			return nil, fmt.Errorf("connection %d to %s: %w", i, target, err)
		}
	}
	return conns, nil
}

func closeAll(conns []*grpc.ClientConn) {
	for _, conn := range conns {
		if conn != nil {
			conn.Close()
		}
	}
}

type streamPlan struct {
	stream    int
	recording *Recording
}

// runStreams opens every stream (RPC and, for typed streams, the config) first, then starts
// them together, stream s offset by s/N of a chunk period.
func runStreams(ctx context.Context, o Options, conns []*grpc.ClientConn, plan []streamPlan, pace bool) []*StreamResult {
	chunk := time.Duration(o.ChunkMs) * time.Millisecond
	results := make([]*StreamResult, len(plan))
	var opened, finished sync.WaitGroup
	start := make(chan time.Time)
	sequenceBase := time.Now().UnixNano() / 1000 * 1000
	for i, p := range plan {
		opened.Add(1)
		finished.Add(1)
		session := &session{
			options: o, plan: p, chunk: chunk, pace: pace,
			offset:     startOffset(i, len(plan), o.StartGroups, chunk),
			sequenceID: sequenceBase + int64(i) + 1,
		}
		results[i] = session.result()
		go func(conn *grpc.ClientConn) {
			defer finished.Done()
			session.run(ctx, conn, &opened, start)
		}(conns[i%len(conns)])
	}
	opened.Wait()
	t0 := time.Now().Add(chunk)
	for range plan {
		start <- t0
	}
	finished.Wait()
	return results
}

// startOffset spreads the streams' starts over one chunk period: each its own, or in groups.
func startOffset(stream, streams, groups int, chunk time.Duration) time.Duration {
	if groups <= 0 || groups > streams {
		groups = streams
	}
	return time.Duration(stream%groups) * chunk / time.Duration(groups)
}

func writeJSON(path string, value interface{}) error {
	text, err := json.MarshalIndent(value, "", "  ")
	if err != nil {
		return err
	}
	text = append(text, '\n')
	if path == "-" {
		_, err = os.Stdout.Write(text)
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, text, 0o644)
}
