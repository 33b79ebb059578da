package main

import (
	"context"
	"io"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
)

// epoch is the origin of every time the sessions record (monotonic).
var epoch = time.Now()

func sinceEpoch() time.Duration { return time.Since(epoch) }

// reply is one response, as both wire formats see it.
type reply struct {
	// Chunks the server has taken so far: the response answers the chunk with this number.
	chunks     int
	final      bool
	detections []Detection
	label      string
	failure    string
}

// wire is one stream's RPC: the typed Stream or a KServe sequence.
type wire interface {
	open(ctx context.Context, conn *grpc.ClientConn) error
	send(chunk int) error
	closeSend() error
	receive() (reply, error)
}

// Detection is a keyword event the server reported, and when it arrived.
type Detection struct {
	Keyword    string  `json:"keyword"`
	StartMs    float64 `json:"start_ms"`
	EndMs      float64 `json:"end_ms"`
	Confidence float32 `json:"confidence"`
	arrived    time.Duration
}

// LabelRun is a run of consecutive responses with the same running label (KServe sequences,
// whose responses carry the running prediction rather than detection events).
type LabelRun struct {
	Label     string `json:"label"`
	Responses int    `json:"responses"`
}

// StreamResult is what one stream recorded.
type StreamResult struct {
	Stream        int    `json:"stream"`
	Recording     int    `json:"recording"`
	RecordingName string `json:"recording_name"`
	ChunksSent    int    `json:"chunks_sent"`
	Responses     int    `json:"responses"`
	// KeptPace: no send later than one chunk period after it was due, never more than one chunk
	// (beyond the report cadence) unanswered, every chunk answered, the final response within
	// two chunk periods of the half-close, and no error. Behind says which failed.
	KeptPace         bool        `json:"kept_pace"`
	Behind           string      `json:"behind,omitempty"`
	MaxSendLagMs     float64     `json:"max_send_lag_ms"`
	MaxBacklogChunks int         `json:"max_backlog_chunks"`
	FinalResponseMs  float64     `json:"final_response_ms"`
	Detections       []Detection `json:"detections"`
	KeywordLatencyMs []float64   `json:"keyword_latency_ms"`
	MissedKeywords   int         `json:"missed_keywords"`
	Labels           []LabelRun  `json:"labels,omitempty"`
	Error            string      `json:"error,omitempty"`
	latenciesMs      []float64
}

type session struct {
	options    Options
	plan       streamPlan
	chunk      time.Duration
	pace       bool
	offset     time.Duration
	sequenceID int64
	res        *StreamResult
	// Send times of the chunks (since epoch, in ns), written by the sender, read by the receiver.
	sent []int64
	// Chunks answered so far.
	acked int64
}

func (s *session) result() *StreamResult {
	if s.res == nil {
		r := s.plan.recording
		s.res = &StreamResult{Stream: s.plan.stream, Recording: r.Index, RecordingName: r.Name,
			Detections: []Detection{}, KeywordLatencyMs: []float64{}}
		s.sent = make([]int64, len(r.PCM16))
	}
	return s.res
}

func (s *session) wire() wire {
	switch s.options.Mode {
	case "kserve":
		return &kserveWire{session: s}
	case "kserve-unary":
		return &kserveUnaryWire{session: s}
	}
	return &typedWire{session: s}
}

// allowedBacklog is how many chunks may be unanswered right after a send: one chunk behind,
// beyond the chunks a report cadence leaves unanswered by design.
func (s *session) allowedBacklog() int {
	cadence := 1
	if s.options.Mode == "typed" && s.options.ReportEveryMs > 0 {
		cadence = int(math.Ceil(float64(s.options.ReportEveryMs) / float64(s.options.ChunkMs)))
	}
	return cadence + 1
}

// run opens the stream, signals `opened`, waits for the common start time, then sends every
// chunk (paced, or as fast as the stream takes them) while a goroutine receives.
func (s *session) run(ctx context.Context, conn *grpc.ClientConn, opened *sync.WaitGroup, start <-chan time.Time) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	res, rec := s.result(), s.plan.recording
	w := s.wire()
	err := w.open(ctx, conn)
	opened.Done()
	t0 := <-start
	if err != nil {
		res.Error = err.Error()
		s.finish(0, 0)
		return
	}
	streamStart := t0.Add(s.offset).Sub(epoch)
	var closedAt time.Duration
	var receiving sync.WaitGroup
	receiving.Add(1)
	var finalAt time.Duration
	go func() {
		defer receiving.Done()
		finalAt = s.receive(w, &closedAt, streamStart)
	}()
	allowed := s.allowedBacklog()
	for i := range rec.PCM16 {
		due := streamStart + time.Duration(i)*s.chunk
		if s.pace {
			if wait := due - sinceEpoch(); wait > 0 {
				time.Sleep(wait)
			}
		}
		now := sinceEpoch()
		if s.pace {
			lag := float64(now-due) / float64(time.Millisecond)
			res.MaxSendLagMs = math.Max(res.MaxSendLagMs, lag)
		}
		atomic.StoreInt64(&s.sent[i], int64(now))
		if err := w.send(i); err != nil {
			break // the receiver gets the RPC's status
		}
		res.ChunksSent++
		if backlog := i + 1 - int(atomic.LoadInt64(&s.acked)); backlog > res.MaxBacklogChunks {
			res.MaxBacklogChunks = backlog
		}
	}
	atomic.StoreInt64((*int64)(&closedAt), int64(sinceEpoch()))
	closeErr := w.closeSend()
	receiving.Wait() // the receiver writes res.Error too
	if closeErr != nil && res.Error == "" {
		res.Error = closeErr.Error()
	}
	if finalAt > 0 {
		res.FinalResponseMs = float64(finalAt-closedAt) / float64(time.Millisecond)
	}
	s.finish(allowed, finalAt)
}

// receive reads every response until the server ends the stream; returns when the final one
// arrived (0 when none did).
func (s *session) receive(w wire, closedAt *time.Duration, streamStart time.Duration) time.Duration {
	res := s.res
	var finalAt time.Duration
	for {
		r, err := w.receive()
		now := sinceEpoch()
		if err == io.EOF {
			return finalAt
		}
		if err != nil {
			if res.Error == "" {
				res.Error = err.Error()
			}
			return finalAt
		}
		res.Responses++
		if r.failure != "" && res.Error == "" {
			res.Error = r.failure
		}
		var sentAt time.Duration
		if r.final && s.options.Mode == "typed" {
			sentAt = time.Duration(atomic.LoadInt64((*int64)(closedAt)))
		} else if r.chunks >= 1 && r.chunks <= len(s.sent) {
			sentAt = time.Duration(atomic.LoadInt64(&s.sent[r.chunks-1]))
		}
		if sentAt > 0 {
			res.latenciesMs = append(res.latenciesMs, float64(now-sentAt)/float64(time.Millisecond))
		}
		if int64(r.chunks) > atomic.LoadInt64(&s.acked) {
			atomic.StoreInt64(&s.acked, int64(r.chunks))
		}
		for _, d := range r.detections {
			d.arrived = now - streamStart
			res.Detections = append(res.Detections, d)
		}
		if r.label != "" {
			if n := len(res.Labels); n > 0 && res.Labels[n-1].Label == r.label {
				res.Labels[n-1].Responses++
			} else {
				res.Labels = append(res.Labels, LabelRun{Label: r.label, Responses: 1})
			}
		}
		if r.final {
			finalAt = now
		}
	}
}

// finish decides whether the stream kept pace and matches detections to the recording's keywords.
func (s *session) finish(allowedBacklog int, finalAt time.Duration) {
	res, rec := s.res, s.plan.recording
	chunkMs := float64(s.chunk) / float64(time.Millisecond)
	switch {
	case res.Error != "":
		res.Behind = "error: " + res.Error
	case res.ChunksSent < len(rec.PCM16) || int(atomic.LoadInt64(&s.acked)) < len(rec.PCM16):
		res.Behind = "not every chunk was sent and answered"
	case finalAt == 0:
		res.Behind = "no final response"
	case s.pace && res.MaxSendLagMs > chunkMs:
		res.Behind = "a send fell more than one chunk behind real time"
	case s.pace && res.MaxBacklogChunks > allowedBacklog:
		res.Behind = "responses fell more than one chunk behind"
	case s.pace && res.FinalResponseMs > 2*chunkMs:
		res.Behind = "the final response came more than two chunk periods after the half-close"
	}
	res.KeptPace = res.Behind == ""
	if s.options.Mode == "typed" {
		res.KeywordLatencyMs, res.MissedKeywords = matchKeywords(rec.Keywords, res.Detections, chunkMs, s.pace)
	}
}

// matchKeywords pairs each spoken keyword with the first unused detection of the same word
// that overlaps it or the 500 ms after it (MLPerf Tiny's window). A keyword ends, in wall
// time, when its last sample would have been recorded: stream start + end_ms - one chunk
// (chunk i, audio [i, i+1) chunk periods, is sent at stream start + i chunk periods). The
// latency runs from there to the arrival of the detection; unpaced streams have none.
func matchKeywords(keywords []Keyword, detections []Detection, chunkMs float64, paced bool) ([]float64, int) {
	used := make([]bool, len(detections))
	latencies := []float64{}
	missed := 0
	for _, k := range keywords {
		found := -1
		for j, d := range detections {
			if !used[j] && d.Keyword == k.Keyword && d.EndMs >= k.StartMs && d.StartMs <= k.EndMs+500 {
				found = j
				break
			}
		}
		if found < 0 {
			missed++
			continue
		}
		used[found] = true
		if paced {
			arrivedMs := float64(detections[found].arrived) / float64(time.Millisecond)
			latencies = append(latencies, arrivedMs-(k.EndMs-chunkMs))
		}
	}
	return latencies, missed
}
