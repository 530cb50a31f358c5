// Package echo is the e2e test workload that answers every call with what it
// saw of it: which pod served it, the peer and local addresses of the
// connection, and the request's host, method, path, protocol and headers.
// Tests send traffic through the mesh and read these replies to check what the
// mesh delivered: whether it arrived at all, from which source address, with
// which headers added or removed.
//
// One Server listens for HTTP/1.1 and h2c on the same ports, for gRPC
// (echo.v1.EchoService and grpc.health.v1), and for raw TCP that is echoed
// back byte for byte. The flags and their environment fallbacks are listed in
// README.md beside this file.
package echo
