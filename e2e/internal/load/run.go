package load

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// Run sends the planned requests and reports what came of them. It returns an
// error only when the run cannot start; failed requests are counted in the
// Result. A done ctx ends the run early and the Result says so.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	var dials atomic.Int64
	clients, err := newClients(&cfg, &dials)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, c := range clients {
			c.close()
		}
	}()

	t := &tally{latency: NewHistogram(), errors: map[string]int64{}, bodies: cfg.Bodies}
	due := make(chan time.Time)
	var workers sync.WaitGroup
	for w := range cfg.Connections * cfg.Streams {
		c := clients[w%cfg.Connections]
		workers.Go(func() {
			for at := range due {
				rctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
				body, err := c.do(rctx)
				cancel()
				// Latency counts from the due time, so time spent waiting
				// for a free connection is not hidden.
				t.record(time.Since(at), body, err)
			}
		})
	}

	start := time.Now()
	planned := cfg.planned()
	sent := schedule(ctx, &cfg, start, planned, due)
	close(due)
	workers.Wait()

	res := &Result{
		Mode:        cfg.Mode,
		Target:      cfg.Target,
		Rate:        cfg.Rate,
		Elapsed:     time.Since(start),
		Planned:     planned,
		Sent:        sent,
		Succeeded:   t.succeeded,
		Failed:      t.failed,
		Errors:      t.errors,
		Latency:     t.latency,
		Interrupted: ctx.Err() != nil,
		Dials:       dials.Load(),
	}
	if !res.Interrupted {
		res.NotSent = planned - sent
	}
	return res, nil
}

// schedule hands due to the workers the time each planned request is due,
// waiting for each time to come, and returns how many it handed over. While
// every worker is busy it waits for one; once a timeout has passed beyond the
// planned end it gives up on the rest.
func schedule(ctx context.Context, cfg *Config, start time.Time, planned int64, due chan<- time.Time) int64 {
	interval := cfg.interval()
	end := start.Add(time.Duration(float64(planned) * interval))
	giveUp := time.NewTimer(time.Until(end) + cfg.Timeout)
	defer giveUp.Stop()
	wait := time.NewTimer(0)
	defer wait.Stop()

	var i int64
	for ; i < planned; i++ {
		at := start.Add(time.Duration(float64(i) * interval))
		if d := time.Until(at); d > 0 {
			wait.Reset(d)
			select {
			case <-wait.C:
			case <-ctx.Done():
				return i
			}
		}
		select {
		case due <- at:
		case <-ctx.Done():
			return i
		case <-giveUp.C:
			return i
		}
	}
	return i
}

// tally collects the outcome of each request from every worker.
type tally struct {
	mu sync.Mutex
	// All fields below are guarded by mu.
	latency           *Histogram
	succeeded, failed int64
	errors            map[string]int64
	bodies            io.Writer
}

func (t *tally) record(latency time.Duration, body []byte, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.failed++
		t.errors[ErrorKind(err)]++
		return
	}
	t.succeeded++
	t.latency.RecordDuration(latency)
	if t.bodies != nil {
		_, _ = t.bodies.Write(body)
		if len(body) == 0 || body[len(body)-1] != '\n' {
			_, _ = t.bodies.Write([]byte{'\n'})
		}
	}
}
