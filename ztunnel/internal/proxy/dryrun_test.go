package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/pkg/hbone"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
)

// logBuffer collects the proxy's JSON log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// records returns the logged lines with message msg, decoded.
func (b *logBuffer) records(t *testing.T, msg string) []map[string]any {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(b.buf.Bytes()))
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// captureLog makes m's proxy log to the returned buffer. It must be called
// before the first connection.
func captureLog(m *mesh) *logBuffer {
	b := &logBuffer{}
	m.proxy.cfg.Log = slog.New(slog.NewJSONHandler(b, nil))
	return b
}

func dryRunPolicy(u state.Update) state.Update {
	u.Resource.(*security.Authorization).DryRun = true
	return u
}

// dryRunLog is what a test expects of the dry-run log line, as JSON values.
type dryRunLog struct {
	decision, policy, enforced string
	policies                   []any
	srcIdentity                string
}

func checkDryRunLog(t *testing.T, logs *logBuffer, want *dryRunLog, src, dst netip.AddrPort, dstWorkload string) {
	t.Helper()
	recs := logs.records(t, "dry-run authorization")
	if want == nil {
		if len(recs) != 0 {
			t.Errorf("dry-run logged without dry-run policies: %v", recs)
		}
		return
	}
	if len(recs) != 1 {
		t.Fatalf("%d dry-run log lines, want 1: %v", len(recs), recs)
	}
	rec := recs[0]
	wantRec := map[string]any{
		"level": "INFO", "dry_run": true, "decision": want.decision, "policy": want.policy, "enforced": want.enforced,
		"policies": want.policies,
		"src":      map[string]any{"addr": src.String(), "identity": want.srcIdentity},
		"dst":      map[string]any{"addr": dst.String(), "workload": dstWorkload},
	}
	for k, v := range wantRec {
		got, _ := json.Marshal(rec[k])
		exp, _ := json.Marshal(v)
		if !bytes.Equal(got, exp) {
			t.Errorf("dry-run log %s = %s, want %s (line %v)", k, got, exp, rec)
		}
	}
}

func TestHBONEDryRunPoliciesAreLoggedNotEnforced(t *testing.T) {
	tests := []struct {
		name     string
		policies []state.Update
		wantLog  *dryRunLog
	}{
		{"a dry-run DENY of the client lets the request through and logs that it would deny",
			[]state.Update{dryRunPolicy(principalPolicy("a", "trial-deny", security.Action_DENY, "cluster.local/ns/a/sa/client"))},
			&dryRunLog{decision: "deny", policy: "a/trial-deny", enforced: "allow", policies: []any{"a/trial-deny"},
				srcIdentity: "spiffe://cluster.local/ns/a/sa/client"}},
		{"a dry-run ALLOW of another principal does not turn on default deny, and logs that it would",
			[]state.Update{dryRunPolicy(principalPolicy("a", "trial-allow", security.Action_ALLOW, "cluster.local/ns/a/sa/other"))},
			&dryRunLog{decision: "deny", policy: "", enforced: "allow", policies: []any{"a/trial-allow"},
				srcIdentity: "spiffe://cluster.local/ns/a/sa/client"}},
		{"without dry-run policies nothing is logged",
			[]state.Update{principalPolicy("a", "allow-client", security.Action_ALLOW, "cluster.local/ns/a/sa/client")},
			nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMesh(t)
			logs := captureLog(m)
			m.apply(security.AuthorizationTypeURL, tt.policies...)
			pool := hbone.NewPool(hbone.PoolOptions{})
			defer pool.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			src := netip.MustParseAddrPort("127.0.0.1:40000")
			key := hbone.Key{Src: m.clientID, Dst: m.echoID, Addr: m.hboneAddr}
			c, err := pool.Connect(ctx, key, m.certs.ClientTLS(m.clientID, []spiffeid.ID{m.echoID}), m.app.String(),
				hbone.Headers{ForwardedFor: src})
			wantConnect(t, c, err, http.StatusOK)
			checkDryRunLog(t, logs, tt.wantLog, src, m.app, podUID("a", "echo"))
		})
	}
}

func TestPlaintextDryRunPoliciesAreLoggedNotEnforced(t *testing.T) {
	m := newMesh(t)
	logs := captureLog(m)
	// As dry-run, STRICT would refuse plaintext; enforced, nothing does.
	strict("a")(m)
	stored := m.store.Policy("a/istio_converted_static_strict")
	m.apply(security.AuthorizationTypeURL, dryRunPolicy(policyUpdate(proto.Clone(stored).(*security.Authorization))))

	ln := serve(t, "127.0.0.2:0", func(c net.Conn) { m.proxy.Inbound(m.echoPod, c, m.app) })
	c, err := net.Dial("tcp", ln.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := roundTrip(c, "hello")
	if err != nil || got != "hello" {
		t.Fatalf("echo = %q, %v; want hello", got, err)
	}
	checkDryRunLog(t, logs, &dryRunLog{decision: "deny", policy: "a/istio_converted_static_strict", enforced: "allow",
		policies: []any{"a/istio_converted_static_strict"}, srcIdentity: unauthenticated},
		addrOf(c.LocalAddr()), m.app, podUID("a", "echo"))
}
