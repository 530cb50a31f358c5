package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/echo"
	"github.com/ambient-mesh/ambient/e2e/internal/load"
)

func TestRun(t *testing.T) {
	s, err := echo.New(echo.Config{
		Bind: "127.0.0.1", HTTPPorts: []int{0}, MaxDelay: time.Second, MaxSize: 1 << 20,
		ShutdownTimeout: time.Second, Logger: slog.New(slog.DiscardHandler),
		Identity: echo.Identity{Pod: "echo-0"},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	addr := s.HTTPAddrs()[0]

	tests := []struct {
		name     string
		args     []string
		wantCode int
		check    func(t *testing.T, stdout, stderr string)
	}{
		{
			name:     "one request with --print-body prints the echo reply to stdout and the summary to stderr",
			args:     []string{"--target", addr + "/hello", "--requests", "1", "--print-body"},
			wantCode: 0,
			check: func(t *testing.T, stdout, stderr string) {
				var r echo.Reply
				if err := json.Unmarshal([]byte(stdout), &r); err != nil || r.Path != "/hello" || r.Pod != "echo-0" {
					t.Errorf("stdout %q: reply %+v, error %v", stdout, r, err)
				}
				if !strings.Contains(stderr, "1 succeeded") {
					t.Errorf("stderr lacks the summary: %q", stderr)
				}
			},
		},
		{
			name:     "--output json prints a summary that decodes",
			args:     []string{"--mode", "h2c", "--target", addr, "--requests", "5", "--rate", "500", "--output", "json"},
			wantCode: 0,
			check: func(t *testing.T, stdout, _ string) {
				var s load.Summary
				if err := json.Unmarshal([]byte(stdout), &s); err != nil || s.Succeeded != 5 {
					t.Errorf("stdout %q: summary %+v, error %v", stdout, s, err)
				}
			},
		},
		{
			name:     "a failed request makes the exit code 1",
			args:     []string{"--target", addr + "/status/500", "--requests", "1"},
			wantCode: 1,
			check: func(t *testing.T, stdout, _ string) {
				if !strings.Contains(stdout, "http_500=1") {
					t.Errorf("summary lacks the error kind: %q", stdout)
				}
			},
		},
		{
			name:     "an unbounded run is refused with exit code 2",
			args:     []string{"--target", addr},
			wantCode: 2,
			check: func(t *testing.T, _, stderr string) {
				if !strings.Contains(stderr, "unbounded") {
					t.Errorf("stderr %q does not say why", stderr)
				}
			},
		},
		{
			name:     "an unknown output format is refused with exit code 2",
			args:     []string{"--target", addr, "--requests", "1", "--output", "yaml"},
			wantCode: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(tt.args, &stdout, &stderr); code != tt.wantCode {
				t.Fatalf("exit code %d, want %d; stderr %q", code, tt.wantCode, stderr.String())
			}
			if tt.check != nil {
				tt.check(t, stdout.String(), stderr.String())
			}
		})
	}
}
