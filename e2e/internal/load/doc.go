// Package load drives requests at a fixed rate against a target and measures
// their latency, for e2e tests that check the mesh under load.
//
// The rate is open loop: request i is due at start + i/rate whatever happened
// to the ones before it, and its latency is measured from that due time, not
// from when a connection was free to send it. A slow server therefore shows up
// as high latency instead of silently lowering the rate (the "coordinated
// omission" that closed-loop load generators hide).
//
// Requests go over a fixed number of connections in one of four modes: HTTP/1.1
// keep-alive, h2c (HTTP/2 with prior knowledge), gRPC calls to the echo
// service, and raw TCP where each request writes bytes and reads them back.
// Runs are always bounded by a request count, a duration, or both, and never
// last longer than MaxDuration.
package load
