package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"

	"google.golang.org/grpc"

	kserve "rnnserve/generated/inference"
	pb "rnnserve/generated/rnnserve/v1"
)

// typedWire is RnnServe.Stream: a config, then PCM16 chunks; a response per chunk at the
// default cadence of this tool (report_every_ms 0), a final one after the half-close.
type typedWire struct {
	session *session
	stream  pb.RnnServe_StreamClient
}

func (t *typedWire) open(ctx context.Context, conn *grpc.ClientConn) error {
	stream, err := pb.NewRnnServeClient(conn).Stream(ctx)
	if err != nil {
		return err
	}
	t.stream = stream
	o, r := t.session.options, t.session.plan.recording
	return stream.Send(&pb.StreamRequest{Kind: &pb.StreamRequest_Config{Config: &pb.StreamConfig{
		Model: o.Model, SampleRateHz: uint32(r.SampleRateHz), ReportEveryMs: uint32(o.ReportEveryMs),
	}}})
}

func (t *typedWire) send(chunk int) error {
	pcm := t.session.plan.recording.PCM16[chunk]
	return t.stream.Send(&pb.StreamRequest{Kind: &pb.StreamRequest_Chunk{Chunk: &pb.StreamChunk{
		Data: &pb.StreamChunk_Pcm16{Pcm16: pcm},
	}}})
}

func (t *typedWire) closeSend() error { return t.stream.CloseSend() }

func (t *typedWire) receive() (reply, error) {
	response, err := t.stream.Recv()
	if err != nil {
		return reply{}, err
	}
	r := reply{chunks: int(response.Chunks), final: response.Final}
	for _, d := range response.Detections {
		r.detections = append(r.detections, Detection{
			Keyword: d.Keyword, StartMs: d.StartMs, EndMs: d.EndMs, Confidence: d.Confidence,
		})
	}
	return r, nil
}

// kserveWire is one Triton-style sequence over its own ModelStreamInfer stream: `audio` FP32
// [1, S] per request with sequence_id, sequence_start on the first and sequence_end on the last;
// one response per request, in order, carrying the running label.
type kserveWire struct {
	session  *session
	stream   kserve.GRPCInferenceService_ModelStreamInferClient
	received int
}

func (k *kserveWire) open(ctx context.Context, conn *grpc.ClientConn) error {
	stream, err := kserve.NewGRPCInferenceServiceClient(conn).ModelStreamInfer(ctx)
	k.stream = stream
	return err
}

func boolParam(value bool) *kserve.InferParameter {
	return &kserve.InferParameter{ParameterChoice: &kserve.InferParameter_BoolParam{BoolParam: value}}
}

func (k *kserveWire) send(chunk int) error { return k.stream.Send(sequenceRequest(k.session, chunk)) }

// sequenceRequest is chunk `chunk` of the session's recording as one request of its sequence.
func sequenceRequest(s *session, chunk int) *kserve.ModelInferRequest {
	r := s.plan.recording
	samples := r.Float32[chunk]
	return &kserve.ModelInferRequest{
		ModelName: s.options.Model,
		Id:        fmt.Sprint(chunk),
		Parameters: map[string]*kserve.InferParameter{
			"sequence_id":    {ParameterChoice: &kserve.InferParameter_Int64Param{Int64Param: s.sequenceID}},
			"sequence_start": boolParam(chunk == 0),
			"sequence_end":   boolParam(chunk == len(r.Float32)-1),
			"sample_rate_hz": {ParameterChoice: &kserve.InferParameter_Int64Param{Int64Param: int64(r.SampleRateHz)}},
		},
		Inputs: []*kserve.ModelInferRequest_InferInputTensor{{
			Name: "audio", Datatype: "FP32", Shape: []int64{1, int64(len(samples) / 4)},
		}},
		Outputs:          []*kserve.ModelInferRequest_InferRequestedOutputTensor{{Name: "label"}},
		RawInputContents: [][]byte{samples},
	}
}

func (k *kserveWire) closeSend() error { return k.stream.CloseSend() }

func (k *kserveWire) receive() (reply, error) {
	response, err := k.stream.Recv()
	if err != nil {
		return reply{}, err
	}
	k.received++
	r := reply{chunks: k.received, final: k.received == len(k.session.plan.recording.Float32)}
	if response.ErrorMessage != "" {
		r.failure = response.ErrorMessage
		return r, nil
	}
	r.label = firstBytesElement(response.InferResponse)
	return r, nil
}

// kserveUnaryWire is one Triton-style sequence over unary ModelInfer calls, as Triton's sequence
// batcher takes them: the same requests as kserveWire, each sent when the previous one was
// answered (a sequence's requests must arrive in order), so a slow answer delays the next send.
type kserveUnaryWire struct {
	session  *session
	ctx      context.Context
	client   kserve.GRPCInferenceServiceClient
	replies  chan reply
	received int
}

func (k *kserveUnaryWire) open(ctx context.Context, conn *grpc.ClientConn) error {
	k.ctx, k.client = ctx, kserve.NewGRPCInferenceServiceClient(conn)
	k.replies = make(chan reply, len(k.session.plan.recording.Float32)+1)
	return nil
}

func (k *kserveUnaryWire) send(chunk int) error {
	response, err := k.client.ModelInfer(k.ctx, sequenceRequest(k.session, chunk))
	if err != nil {
		k.replies <- reply{failure: err.Error()}
		return err
	}
	k.received++
	k.replies <- reply{chunks: k.received, final: k.received == len(k.session.plan.recording.Float32),
		label: firstBytesElement(response)}
	return nil
}

func (k *kserveUnaryWire) closeSend() error {
	close(k.replies)
	return nil
}

func (k *kserveUnaryWire) receive() (reply, error) {
	r, ok := <-k.replies
	if !ok {
		return reply{}, io.EOF
	}
	return r, nil
}

// firstBytesElement is the first element of the `label` BYTES output (raw: 4-byte little-endian
// length, then the bytes), or "" when there is none.
func firstBytesElement(response *kserve.ModelInferResponse) string {
	for i, output := range response.GetOutputs() {
		if output.Name != "label" || i >= len(response.RawOutputContents) {
			continue
		}
		raw := response.RawOutputContents[i]
		if len(raw) < 4 {
			return ""
		}
		size := int(binary.LittleEndian.Uint32(raw))
		if 4+size > len(raw) {
			return ""
		}
		return string(raw[4 : 4+size])
	}
	return ""
}
