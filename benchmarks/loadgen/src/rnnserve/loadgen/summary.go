package main

import (
	"math"
	"sort"
	"syscall"
	"time"
)

// Distribution is a set of values in milliseconds, summarised.
type Distribution struct {
	Count int     `json:"count"`
	Mean  float64 `json:"mean"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	Max   float64 `json:"max"`
}

// percentile interpolates linearly between the closest ranks, like numpy's default.
func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	position := q / 100 * float64(len(sorted)-1)
	low := int(math.Floor(position))
	high := int(math.Ceil(position))
	return sorted[low] + (sorted[high]-sorted[low])*(position-float64(low))
}

func distribution(values []float64) *Distribution {
	if len(values) == 0 {
		return nil
	}
	sorted := append([]float64(nil), values...)
	sort.Float64s(sorted)
	total := 0.0
	for _, v := range sorted {
		total += v
	}
	return &Distribution{
		Count: len(sorted), Mean: total / float64(len(sorted)), P50: percentile(sorted, 50),
		P90: percentile(sorted, 90), P99: percentile(sorted, 99), Max: sorted[len(sorted)-1],
	}
}

// RecordingInfo describes one recording of the manifest.
type RecordingInfo struct {
	Name      string  `json:"name"`
	DurationS float64 `json:"duration_s"`
	Keywords  int     `json:"keywords"`
}

// Summary is the JSON the tool writes.
type Summary struct {
	Mode          string  `json:"mode"`
	Target        string  `json:"target"`
	Model         string  `json:"model"`
	Streams       int     `json:"streams"`
	Alone         bool    `json:"alone"`
	ChunkMs       int     `json:"chunk_ms"`
	ReportEveryMs int     `json:"report_every_ms"`
	WallS         float64 `json:"wall_s"`
	// The load generator's own CPU time (user + system) over the run, set-up included.
	ClientCPUS       float64         `json:"client_cpu_s"`
	ChunksSent       int             `json:"chunks_sent"`
	Responses        int             `json:"responses"`
	LatencyMs        *Distribution   `json:"latency_ms"`
	MaxSendLagMs     float64         `json:"max_send_lag_ms"`
	StreamsKeptPace  int             `json:"streams_kept_pace"`
	AllKeptPace      bool            `json:"all_kept_pace"`
	Behind           map[string]int  `json:"behind"`
	KeywordLatencyMs *Distribution   `json:"keyword_latency_ms"`
	KeywordsSpoken   int             `json:"keywords_spoken"`
	KeywordsMissed   int             `json:"keywords_missed"`
	StreamErrors     int             `json:"stream_errors"`
	FirstError       string          `json:"first_error,omitempty"`
	Recordings       []RecordingInfo `json:"recordings"`
	PerStream        []*StreamResult `json:"per_stream"`
}

func summarize(o Options, recordings []Recording, results []*StreamResult, wall time.Duration) *Summary {
	s := &Summary{
		Mode: o.Mode, Target: o.Target, Model: o.Model, Streams: len(results), Alone: o.Alone,
		ChunkMs: o.ChunkMs, ReportEveryMs: o.ReportEveryMs, WallS: wall.Seconds(),
		Behind: map[string]int{}, PerStream: results, Recordings: []RecordingInfo{},
	}
	var latencies, keywordLatencies []float64
	for _, r := range results {
		s.ChunksSent += r.ChunksSent
		s.Responses += r.Responses
		latencies = append(latencies, r.latenciesMs...)
		keywordLatencies = append(keywordLatencies, r.KeywordLatencyMs...)
		s.MaxSendLagMs = math.Max(s.MaxSendLagMs, r.MaxSendLagMs)
		if r.KeptPace {
			s.StreamsKeptPace++
		} else {
			s.Behind[r.Behind]++
		}
		if r.Error != "" {
			s.StreamErrors++
			if s.FirstError == "" {
				s.FirstError = r.Error
			}
		}
		s.KeywordsMissed += r.MissedKeywords
		if o.Mode == "typed" {
			s.KeywordsSpoken += len(recordings[r.Recording].Keywords)
		}
	}
	s.AllKeptPace = s.StreamsKeptPace == len(results)
	var usage syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &usage) == nil {
		s.ClientCPUS = time.Duration(usage.Utime.Nano() + usage.Stime.Nano()).Seconds()
	}
	s.LatencyMs = distribution(latencies)
	s.KeywordLatencyMs = distribution(keywordLatencies)
	for _, r := range recordings {
		s.Recordings = append(s.Recordings, RecordingInfo{
			Name: r.Name, DurationS: r.Duration.Seconds(), Keywords: len(r.Keywords),
		})
	}
	return s
}
