package echo

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

func TestHTTPEcho(t *testing.T) {
	s := startServer(t)
	addr := s.HTTPAddrs()[0]

	tests := []struct {
		name       string
		h2c        bool
		method     string
		path       string
		body       string
		header     http.Header
		wantStatus int
		// check looks at the reply; local is the client's address.
		check func(t *testing.T, resp *http.Response, body []byte, local string)
	}{
		{
			name:       "an HTTP/1.1 GET is answered with the workload, both addresses, the request line and headers",
			method:     http.MethodGet,
			path:       "/some/path?a=b",
			header:     http.Header{"X-Test": {"one", "two"}},
			wantStatus: http.StatusOK,
			check: func(t *testing.T, resp *http.Response, body []byte, local string) {
				r := decodeReply(t, body)
				want := Reply{
					Pod: testIdentity.Pod, Namespace: testIdentity.Namespace, PodIP: testIdentity.PodIP,
					Hostname: testIdentity.Hostname, Version: testIdentity.Version,
					LocalAddress: addr, PeerAddress: local, Host: addr,
					Method: "GET", Path: "/some/path", Query: "a=b", Proto: "HTTP/1.1",
				}
				compareReply(t, r, want)
				if got := r.Headers["X-Test"]; !slices.Equal(got, []string{"one", "two"}) {
					t.Errorf("X-Test header %q, want [one two]", got)
				}
				if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
					t.Errorf("content type %q, want application/json", ct)
				}
			},
		},
		{
			name:       "an h2c request with prior knowledge is answered over HTTP/2",
			h2c:        true,
			method:     http.MethodGet,
			path:       "/h2",
			header:     http.Header{"X-Test": {"h2"}},
			wantStatus: http.StatusOK,
			check: func(t *testing.T, resp *http.Response, body []byte, local string) {
				if resp.ProtoMajor != 2 {
					t.Errorf("reply proto %s, want HTTP/2", resp.Proto)
				}
				r := decodeReply(t, body)
				compareReply(t, r, Reply{
					Pod: testIdentity.Pod, Namespace: testIdentity.Namespace, PodIP: testIdentity.PodIP,
					Hostname: testIdentity.Hostname, Version: testIdentity.Version,
					LocalAddress: addr, PeerAddress: local, Host: addr,
					Method: "GET", Path: "/h2", Proto: "HTTP/2.0",
				})
				if got := r.Headers["X-Test"]; !slices.Equal(got, []string{"h2"}) {
					t.Errorf("X-Test header %q, want [h2]", got)
				}
			},
		},
		{
			name:       "a POST body is counted in request_bytes",
			method:     http.MethodPost,
			path:       "/upload",
			body:       "hello, mesh",
			wantStatus: http.StatusOK,
			check: func(t *testing.T, _ *http.Response, body []byte, _ string) {
				if r := decodeReply(t, body); r.RequestBytes != int64(len("hello, mesh")) || r.Method != "POST" {
					t.Errorf("method %s, request_bytes %d; want POST, %d", r.Method, r.RequestBytes, len("hello, mesh"))
				}
			},
		},
		{
			name:       "/status/<code> answers with that code and still describes the request",
			method:     http.MethodGet,
			path:       "/status/503",
			wantStatus: http.StatusServiceUnavailable,
			check: func(t *testing.T, _ *http.Response, body []byte, _ string) {
				if r := decodeReply(t, body); r.Path != "/status/503" || r.Pod != testIdentity.Pod {
					t.Errorf("reply path %q pod %q, want /status/503 %s", r.Path, r.Pod, testIdentity.Pod)
				}
			},
		},
		{
			name:       "?size answers exactly that many bytes",
			h2c:        true,
			method:     http.MethodGet,
			path:       "/?size=70000",
			wantStatus: http.StatusOK,
			check: func(t *testing.T, resp *http.Response, body []byte, _ string) {
				if len(body) != 70000 {
					t.Errorf("body is %d bytes, want 70000", len(body))
				}
				if ct := resp.Header.Get("Content-Type"); ct != "application/octet-stream" {
					t.Errorf("content type %q, want application/octet-stream", ct)
				}
			},
		},
		{
			name:       "?format=text answers key=value lines, one per header value",
			method:     http.MethodGet,
			path:       "/text?format=text",
			header:     http.Header{"X-Test": {"one", "two"}},
			wantStatus: http.StatusOK,
			check: func(t *testing.T, _ *http.Response, body []byte, local string) {
				lines := strings.Split(string(body), "\n")
				for _, want := range []string{
					"pod=" + testIdentity.Pod,
					"namespace=" + testIdentity.Namespace,
					"peer_address=" + local,
					"local_address=" + addr,
					"path=/text",
					"proto=HTTP/1.1",
					"header.X-Test=one",
					"header.X-Test=two",
				} {
					if !slices.Contains(lines, want) {
						t.Errorf("text reply lacks line %q:\n%s", want, body)
					}
				}
			},
		},
		{
			name:       "paths are echoed as sent, without cleaning",
			method:     http.MethodGet,
			path:       "/a//b/../c",
			wantStatus: http.StatusOK,
			check: func(t *testing.T, _ *http.Response, body []byte, _ string) {
				if r := decodeReply(t, body); r.Path != "/a//b/../c" {
					t.Errorf("path %q, want /a//b/../c", r.Path)
				}
			},
		},
		{
			name:       "a delay within the bound is waited out",
			method:     http.MethodGet,
			path:       "/?delay=5ms",
			wantStatus: http.StatusOK,
		},
		{
			name:       "a delay beyond the bound is refused",
			method:     http.MethodGet,
			path:       "/?delay=1h",
			wantStatus: http.StatusBadRequest,
		},
		{
			name:       "a status outside 200 to 599 is refused",
			method:     http.MethodGet,
			path:       "/status/99",
			wantStatus: http.StatusBadRequest,
		},
		{
			name:       "a size beyond the bound is refused",
			method:     http.MethodGet,
			path:       "/?size=2000000",
			wantStatus: http.StatusBadRequest,
		},
		{
			name:       "a body beyond the bound is refused",
			h2c:        true,
			method:     http.MethodPost,
			path:       "/",
			body:       strings.Repeat("x", 2<<20),
			wantStatus: http.StatusRequestEntityTooLarge,
		},
		{
			name:       "/healthz answers ok while serving",
			method:     http.MethodGet,
			path:       "/healthz",
			wantStatus: http.StatusOK,
			check: func(t *testing.T, _ *http.Response, body []byte, _ string) {
				if string(body) != "ok\n" {
					t.Errorf("healthz body %q, want ok", body)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dialer := &recordingDialer{}
			tr := &http.Transport{DialContext: dialer.DialContext}
			if tt.h2c {
				tr.Protocols = new(http.Protocols)
				tr.Protocols.SetUnencryptedHTTP2(true)
			}
			defer tr.CloseIdleConnections()
			req, err := http.NewRequestWithContext(t.Context(), tt.method, "http://"+addr+tt.path, strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			for k, vs := range tt.header {
				for _, v := range vs {
					req.Header.Add(k, v)
				}
			}
			resp, err := (&http.Client{Transport: tr}).Do(req)
			if err != nil {
				t.Fatalf("request: %v", err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatalf("reading reply: %v", err)
			}
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %d, want %d; body %q", resp.StatusCode, tt.wantStatus, body)
			}
			if tt.check != nil {
				tt.check(t, resp, body, dialer.Local())
			}
		})
	}
}

func decodeReply(t *testing.T, body []byte) Reply {
	t.Helper()
	var r Reply
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("decoding reply %q: %v", body, err)
	}
	return r
}

// compareReply compares every field but Headers and RequestBytes.
func compareReply(t *testing.T, got, want Reply) {
	t.Helper()
	got.Headers, want.Headers = nil, nil
	got.RequestBytes, want.RequestBytes = 0, 0
	if !reflect.DeepEqual(got, want) {
		t.Errorf("reply\n got %+v\nwant %+v", got, want)
	}
}

// TestHTTPUpgradeToH2C speaks the RFC 7540 section 3.2 Upgrade by hand, since
// Go's HTTP client does not.
func TestHTTPUpgradeToH2C(t *testing.T) {
	s := startServer(t)
	addr := s.HTTPAddrs()[0]
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))

	// HTTP2-Settings carries SETTINGS_MAX_CONCURRENT_STREAMS = 100.
	const upgrade = "GET /upgrade HTTP/1.1\r\nHost: echo.test\r\n" +
		"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n" +
		"X-Test: upgraded\r\n\r\n"
	if _, err := io.WriteString(conn, upgrade); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading upgrade reply: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade answered %s, want 101", resp.Status)
	}

	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, br)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	// The upgrade request is stream 1; send a second request as stream 3.
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "echo.test"}, {":path", "/second"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}

	status := map[uint32]string{}
	bodies := map[uint32]*bytes.Buffer{1: {}, 3: {}}
	ended := map[uint32]bool{}
	for !ended[1] || !ended[3] {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading frames: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = fr.WriteSettingsAck()
			}
		case *http2.MetaHeadersFrame:
			status[f.StreamID] = f.PseudoValue("status")
			ended[f.StreamID] = ended[f.StreamID] || f.StreamEnded()
		case *http2.DataFrame:
			bodies[f.StreamID].Write(f.Data())
			ended[f.StreamID] = ended[f.StreamID] || f.StreamEnded()
		case *http2.GoAwayFrame:
			t.Fatalf("server sent GOAWAY: %v", f.ErrCode)
		}
	}

	first, second := decodeReply(t, bodies[1].Bytes()), decodeReply(t, bodies[3].Bytes())
	if status[1] != "200" || status[3] != "200" {
		t.Errorf("statuses %v, want 200 on streams 1 and 3", status)
	}
	// The upgrade request itself was sent as HTTP/1.1 and is reported so;
	// only its reply travels over HTTP/2.
	if first.Path != "/upgrade" || !slices.Equal(first.Headers["X-Test"], []string{"upgraded"}) {
		t.Errorf("upgrade request seen as path %q headers %v", first.Path, first.Headers)
	}
	if second.Path != "/second" || second.Proto != "HTTP/2.0" || second.Host != "echo.test" {
		t.Errorf("second request seen as path %q proto %q host %q, want /second HTTP/2.0 echo.test",
			second.Path, second.Proto, second.Host)
	}
	if first.PeerAddress != conn.LocalAddr().String() || second.PeerAddress != first.PeerAddress {
		t.Errorf("peers %q and %q, want both %q", first.PeerAddress, second.PeerAddress, conn.LocalAddr())
	}
}
