package kubeletapi

import (
	"crypto/tls"
	"crypto/x509/pkix"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestRequestsAreAuthenticatedAndAuthorized(t *testing.T) {
	env := newTestEnv(t)
	if err := os.WriteFile(env.rt.logPath, []byte("2026-01-02T03:04:05Z stdout F hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	other := newTestCA(t, "other-ca")
	strangerCert, strangerKey := other.issue(t, pkix.Name{CommonName: "mallory"}, false)
	stranger, err := tls.X509KeyPair(strangerCert, strangerKey)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		path     string
		token    string
		certs    []tls.Certificate
		want     int
		wantBody string
		tlsFails bool
	}{
		{name: "healthz needs no credentials", path: "/healthz", want: 200, wantBody: "ok"},
		{name: "a request without credentials is unauthenticated", path: "/containerLogs/default/web/app", want: 401, wantBody: "Unauthorized"},
		{name: "the apiserver's client certificate is allowed", path: "/containerLogs/default/web/app", certs: []tls.Certificate{env.admin}, want: 200, wantBody: "hi\n"},
		{name: "an allowed bearer token is allowed", path: "/containerLogs/default/web/app", token: "alice-token", want: 200, wantBody: "hi\n"},
		{name: "a denied bearer token is forbidden", path: "/containerLogs/default/web/app", token: "bob-token", want: 403,
			wantBody: "Forbidden (user=bob, verb=get, resource=nodes, subresource(s)=[proxy])"},
		{name: "an unknown bearer token is unauthenticated", path: "/containerLogs/default/web/app", token: "nobody", want: 401},
		{name: "a certificate from another CA fails the handshake", path: "/healthz", certs: []tls.Certificate{stranger}, tlsFails: true},
		{name: "an unknown pod is not found", path: "/containerLogs/default/nope/app", token: "alice-token", want: 404},
		{name: "an unknown container is not found", path: "/containerLogs/default/web/nope", token: "alice-token", want: 404},
		{name: "an unknown path is not found after authorization", path: "/spec", token: "alice-token", want: 404},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest("GET", env.url(tt.path), nil)
			if err != nil {
				t.Fatal(err)
			}
			if tt.token != "" {
				req.Header.Set("Authorization", "Bearer "+tt.token)
			}
			resp, err := env.httpClient(tt.certs...).Do(req)
			if tt.tlsFails {
				if err == nil {
					resp.Body.Close()
					t.Fatalf("got %s, want a TLS error", resp.Status)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.want || !strings.Contains(string(body), tt.wantBody) {
				t.Errorf("got %d %q, want %d containing %q", resp.StatusCode, body, tt.want, tt.wantBody)
			}
		})
	}
}

func TestAuthorizationAsksAboutTheNodeAndCachesAnswers(t *testing.T) {
	env := newTestEnv(t)
	get := func(token, path string) int {
		req, _ := http.NewRequest("GET", env.url(path), nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := env.httpClient().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for range 3 {
		get("alice-token", "/containerLogs/default/web/app")
		get("bob-token", "/stats/summary")
	}
	asked := env.rev.asked()
	if len(asked) != 2 {
		t.Fatalf("asked %d SubjectAccessReviews, want 2 (answers cached): %+v", len(asked), asked)
	}
	alice, bob := asked[0], asked[1]
	if alice.User != "alice" || alice.UID != "u-1" || !slices.Equal(alice.Groups, []string{"devs", "system:authenticated"}) {
		t.Errorf("alice's review names %q %q %v", alice.User, alice.UID, alice.Groups)
	}
	ra := *alice.ResourceAttributes
	if ra.Verb != "get" || ra.Resource != "nodes" || ra.Subresource != "proxy" || ra.Name != testNode || ra.Version != "v1" || ra.Group != "" {
		t.Errorf("alice's review asks about %+v", ra)
	}
	if sub := bob.ResourceAttributes.Subresource; sub != "stats" {
		t.Errorf("/stats asked about subresource %q", sub)
	}
	env.rev.mu.Lock()
	defer env.rev.mu.Unlock()
	if env.rev.trCount != 2 {
		t.Errorf("made %d TokenReviews, want 2 (answers cached)", env.rev.trCount)
	}
}

func TestRequestAttributesFollowTheKubelet(t *testing.T) {
	tests := []struct {
		name   string
		method string
		path   string
		verb   string
		subs   []string
	}{
		{"logs of a container are proxy", "GET", "/containerLogs/ns/p/c", "get", []string{"proxy"}},
		{"an exec upgrade by POST is create on proxy", "POST", "/exec/ns/p/c", "create", []string{"proxy"}},
		{"an exec upgrade by GET is get on proxy", "GET", "/exec/ns/p/c", "get", []string{"proxy"}},
		{"port-forward is proxy", "POST", "/portForward/ns/p", "create", []string{"proxy"}},
		{"stats are stats", "GET", "/stats/summary", "get", []string{"stats"}},
		{"metrics are metrics", "GET", "/metrics/cadvisor", "get", []string{"metrics"}},
		{"node logs are log", "GET", "/logs/syslog", "get", []string{"log"}},
		{"checkpoint is checkpoint", "POST", "/checkpoint/ns/p/c", "create", []string{"checkpoint"}},
		{"pods try pods then proxy", "GET", "/pods", "get", []string{"pods", "proxy"}},
		{"a HEAD is get", "HEAD", "/pods/", "get", []string{"pods", "proxy"}},
		{"a prefix that is not a path segment does not count", "GET", "/statsx", "get", []string{"proxy"}},
		{"PUT is update", "PUT", "/x", "update", []string{"proxy"}},
		{"PATCH is patch", "PATCH", "/x", "patch", []string{"proxy"}},
		{"DELETE is delete", "DELETE", "/x", "delete", []string{"proxy"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if v := apiVerb(tt.method); v != tt.verb {
				t.Errorf("verb %q, want %q", v, tt.verb)
			}
			if s := subresourcesFor(tt.path); !slices.Equal(s, tt.subs) {
				t.Errorf("subresources %v, want %v", s, tt.subs)
			}
		})
	}
}
