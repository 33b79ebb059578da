package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"time"
)

// Keyword is one spoken keyword of a recording, in milliseconds from its start.
type Keyword struct {
	Keyword string  `json:"keyword"`
	StartMs float64 `json:"start_ms"`
	EndMs   float64 `json:"end_ms"`
}

type manifestFile struct {
	Recordings []struct {
		Name     string    `json:"name"`
		Wav      string    `json:"wav"`
		Keywords []Keyword `json:"keywords"`
	} `json:"recordings"`
}

// Recording is one manifest entry with its audio cut into chunks, as both wire formats.
type Recording struct {
	Index        int
	Name         string
	Keywords     []Keyword
	SampleRateHz int
	Duration     time.Duration
	// PCM16 chunks (typed streams) and the same samples as little-endian float32 in [-1, 1]
	// (KServe `audio` FP32 [1, S]); the last chunk may be shorter.
	PCM16   [][]byte
	Float32 [][]byte
}

// loadManifest reads the manifest and its WAV files (paths relative to the manifest).
func loadManifest(path string, chunkMs int) ([]Recording, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var manifest manifestFile
	if err := json.Unmarshal(text, &manifest); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(manifest.Recordings) == 0 {
		return nil, fmt.Errorf("%s: no recordings", path)
	}
	recordings := make([]Recording, len(manifest.Recordings))
	for i, entry := range manifest.Recordings {
		wavPath := entry.Wav
		if !filepath.IsAbs(wavPath) {
			wavPath = filepath.Join(filepath.Dir(path), wavPath)
		}
		samples, rate, err := readWAV(wavPath)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", wavPath, err)
		}
		step := rate * chunkMs / 1000
		if step < 1 || len(samples) == 0 {
			return nil, fmt.Errorf("%s: no audio, or a chunk shorter than one sample", wavPath)
		}
		r := Recording{
			Index: i, Name: entry.Name, Keywords: entry.Keywords, SampleRateHz: rate,
			Duration: time.Duration(len(samples)) * time.Second / time.Duration(rate),
		}
		for offset := 0; offset < len(samples); offset += step {
			end := offset + step
			if end > len(samples) {
				end = len(samples)
			}
			piece := samples[offset:end]
			pcm := make([]byte, 2*len(piece))
			floats := make([]byte, 4*len(piece))
			for j, sample := range piece {
				binary.LittleEndian.PutUint16(pcm[2*j:], uint16(sample))
				binary.LittleEndian.PutUint32(floats[4*j:], math.Float32bits(float32(sample)/32768))
			}
			r.PCM16 = append(r.PCM16, pcm)
			r.Float32 = append(r.Float32, floats)
		}
		recordings[i] = r
	}
	return recordings, nil
}

// readWAV reads a mono 16-bit PCM WAV file: its samples and sample rate.
func readWAV(path string) ([]int16, int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	if len(data) < 12 || string(data[0:4]) != "RIFF" || string(data[8:12]) != "WAVE" {
		return nil, 0, fmt.Errorf("not a RIFF/WAVE file")
	}
	rate, channels, bits := 0, 0, 0
	for offset := 12; offset+8 <= len(data); {
		id := string(data[offset : offset+4])
		size := int(binary.LittleEndian.Uint32(data[offset+4:]))
		body := offset + 8
		if body+size > len(data) {
			size = len(data) - body
		}
		switch id {
		case "fmt ":
			if size < 16 {
				return nil, 0, fmt.Errorf("fmt chunk of %d bytes", size)
			}
			format := binary.LittleEndian.Uint16(data[body:])
			channels = int(binary.LittleEndian.Uint16(data[body+2:]))
			rate = int(binary.LittleEndian.Uint32(data[body+4:]))
			bits = int(binary.LittleEndian.Uint16(data[body+14:]))
			if format != 1 || channels != 1 || bits != 16 {
				return nil, 0, fmt.Errorf("format %d, %d channels, %d bits: mono 16-bit PCM needed", format, channels, bits)
			}
		case "data":
			if rate == 0 {
				return nil, 0, fmt.Errorf("data chunk before fmt chunk")
			}
			samples := make([]int16, size/2)
			for i := range samples {
				samples[i] = int16(binary.LittleEndian.Uint16(data[body+2*i:]))
			}
			return samples, rate, nil
		}
		offset = body + size + size%2
	}
	return nil, 0, fmt.Errorf("no data chunk")
}
