package authn

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// fakeJWT returns a token whose payload carries exp; the signature is junk,
// which is fine because only the API server (here: the reactor) judges it.
func fakeJWT(name string, exp time.Time) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"RS256"}`)) + "." +
		enc([]byte(fmt.Sprintf(`{"sub":%q,"exp":%d}`, name, exp.Unix()))) + "." + enc([]byte("sig-"+name))
}

// reviewer answers TokenReviews from a table of known tokens, like the API
// server would: tokens have an audience list and an identity.
type reviewer struct {
	calls  atomic.Int32
	tokens map[string]struct {
		aud  []string
		user authenticationv1.UserInfo
	}
	fail error // returned for every review when set
}

func (r *reviewer) react(action k8stesting.Action) (bool, runtime.Object, error) {
	r.calls.Add(1)
	if r.fail != nil {
		return true, nil, r.fail
	}
	tr := action.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview).DeepCopy()
	t, ok := r.tokens[tr.Spec.Token]
	switch {
	case !ok:
		tr.Status = authenticationv1.TokenReviewStatus{Error: "[invalid bearer token, token is expired (exp)]"}
	case !intersects(t.aud, tr.Spec.Audiences):
		tr.Status = authenticationv1.TokenReviewStatus{Error: fmt.Sprintf("[invalid bearer token, token audiences %q is invalid for the target audiences %q]", t.aud, tr.Spec.Audiences)}
	default:
		tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, User: t.user, Audiences: tr.Spec.Audiences}
	}
	return true, tr, nil
}

func newTestAuthenticator(t *testing.T) (*Authenticator, *reviewer, map[string]string) {
	t.Helper()
	exp := time.Now().Add(time.Hour)
	toks := map[string]string{
		"ztunnel":  fakeJWT("ztunnel", exp),
		"wrongaud": fakeJWT("wrongaud", exp),
		"expired":  fakeJWT("expired", time.Now().Add(-time.Hour)),
	}
	r := &reviewer{tokens: map[string]struct {
		aud  []string
		user authenticationv1.UserInfo
	}{
		toks["ztunnel"]: {aud: []string{"istio-ca"}, user: authenticationv1.UserInfo{
			Username: "system:serviceaccount:istio-system:ztunnel",
			Groups:   []string{"system:serviceaccounts", "system:authenticated"},
			Extra: map[string]authenticationv1.ExtraValue{
				extraPodName: {"ztunnel-abc"}, extraPodUID: {"uid-1"}, extraNodeName: {"node-1"},
			},
		}},
		toks["wrongaud"]: {aud: []string{"https://kubernetes.default.svc"}, user: authenticationv1.UserInfo{Username: "system:serviceaccount:a:b"}},
	}}
	c := fake.NewClientset()
	c.PrependReactor("create", "tokenreviews", r.react)
	return NewAuthenticator(c, nil), r, toks
}

func withBearer(token string) context.Context {
	return metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+token))
}

func TestAuthenticate(t *testing.T) {
	a, _, toks := newTestAuthenticator(t)
	tests := []struct {
		name    string
		ctx     context.Context
		want    Identity
		wantErr error
		errText string
	}{
		{
			name: "a bound ztunnel token yields its service account, pod and node",
			ctx:  withBearer(toks["ztunnel"]),
			want: Identity{
				Username: "system:serviceaccount:istio-system:ztunnel", Groups: []string{"system:serviceaccounts", "system:authenticated"},
				ServiceAccount: "ztunnel", Namespace: "istio-system", PodName: "ztunnel-abc", PodUID: "uid-1", NodeName: "node-1",
			},
		},
		{name: "no metadata is no token", ctx: context.Background(), wantErr: ErrNoToken},
		{name: "a basic auth header is no token", ctx: metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Basic Zm9vOmJhcg==")), wantErr: ErrNoToken},
		{name: "an empty bearer is no token", ctx: metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer ")), wantErr: ErrNoToken},
		{name: "a token for another audience is rejected with the reason", ctx: withBearer(toks["wrongaud"]), wantErr: ErrTokenRejected, errText: "invalid for the target audiences"},
		{name: "an expired token is rejected with the reason", ctx: withBearer(toks["expired"]), wantErr: ErrTokenRejected, errText: "expired"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := a.Authenticate(tt.ctx)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || !errors.Is(err, ErrUnauthenticated) {
					t.Fatalf("err = %v, want %v wrapping ErrUnauthenticated", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.errText) {
					t.Errorf("err = %q, want it to contain %q", err, tt.errText)
				}
				for _, tok := range toks {
					if strings.Contains(err.Error(), tok) {
						t.Errorf("error text contains a token: %q", err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestAuthenticateCaches(t *testing.T) {
	a, r, toks := newTestAuthenticator(t)
	now := time.Now()
	a.now = func() time.Time { return now }

	for i := 0; i < 3; i++ {
		if _, err := a.Authenticate(withBearer(toks["ztunnel"])); err != nil {
			t.Fatal(err)
		}
	}
	if got := r.calls.Load(); got != 1 {
		t.Fatalf("three authentications of one token did %d TokenReviews, want 1", got)
	}

	// Within the success cap the verdict is reused; past it, reviewed again.
	now = now.Add(maxSuccessTTL - time.Second)
	a.Authenticate(withBearer(toks["ztunnel"]))
	if got := r.calls.Load(); got != 1 {
		t.Fatalf("TokenReviews = %d before the cache cap, want 1", got)
	}
	now = now.Add(2 * time.Second)
	a.Authenticate(withBearer(toks["ztunnel"]))
	if got := r.calls.Load(); got != 2 {
		t.Fatalf("TokenReviews = %d after the cache cap, want 2", got)
	}

	// Rejections are remembered briefly.
	r.calls.Store(0)
	a.Authenticate(withBearer(toks["wrongaud"]))
	a.Authenticate(withBearer(toks["wrongaud"]))
	if got := r.calls.Load(); got != 1 {
		t.Fatalf("TokenReviews for a rejected token = %d, want 1", got)
	}
	now = now.Add(failureTTL + time.Second)
	a.Authenticate(withBearer(toks["wrongaud"]))
	if got := r.calls.Load(); got != 2 {
		t.Fatalf("TokenReviews after the failure TTL = %d, want 2", got)
	}
}

func TestAuthenticateCachesUntilShortlyBeforeExpiry(t *testing.T) {
	a, r, _ := newTestAuthenticator(t)
	now := time.Now()
	a.now = func() time.Time { return now }
	tok := fakeJWT("short", now.Add(time.Minute))
	r.tokens[tok] = struct {
		aud  []string
		user authenticationv1.UserInfo
	}{aud: []string{"istio-ca"}, user: authenticationv1.UserInfo{Username: "system:serviceaccount:a:b"}}

	a.Authenticate(withBearer(tok))
	now = now.Add(time.Minute - expiryMargin + time.Second)
	a.Authenticate(withBearer(tok))
	if got := r.calls.Load(); got != 2 {
		t.Fatalf("TokenReviews = %d, want 2: a token close to exp must be reviewed again", got)
	}
}

func TestReviewFailureIsNotCached(t *testing.T) {
	a, r, toks := newTestAuthenticator(t)
	r.fail = errors.New("connection refused")
	_, err := a.Authenticate(withBearer(toks["ztunnel"]))
	if !errors.Is(err, ErrReviewFailed) || !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("err = %v, want ErrReviewFailed", err)
	}
	r.fail = nil
	if _, err := a.Authenticate(withBearer(toks["ztunnel"])); err != nil {
		t.Fatalf("after the API server recovers: %v", err)
	}
}

func TestConcurrentAuthenticationsShareOneReview(t *testing.T) {
	a, r, toks := newTestAuthenticator(t)
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := a.Authenticate(withBearer(toks["ztunnel"])); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := r.calls.Load(); got > 2 {
		t.Errorf("50 concurrent authentications did %d TokenReviews", got)
	}
}

func TestCacheIsBounded(t *testing.T) {
	a, _, _ := newTestAuthenticator(t)
	a.maxSize = 8
	for i := 0; i < 100; i++ {
		a.Authenticate(withBearer(fmt.Sprintf("unknown-%d", i)))
	}
	if n := len(a.cache); n > a.maxSize {
		t.Errorf("cache holds %d entries, bound is %d", n, a.maxSize)
	}
}

func TestAudienceUnawareReviewIsRejected(t *testing.T) {
	c := fake.NewClientset()
	c.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		tr := action.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview).DeepCopy()
		// Authenticated, but status.audiences is empty: the reviewer never
		// checked the token against our audience.
		tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: "system:serviceaccount:a:b"}}
		return true, tr, nil
	})
	_, err := NewAuthenticator(c, []string{"istio-ca"}).Authenticate(withBearer("some-token"))
	if !errors.Is(err, ErrTokenRejected) || !strings.Contains(err.Error(), "do not include") {
		t.Fatalf("err = %v, want a rejection for the audience", err)
	}
}

func TestParseServiceAccount(t *testing.T) {
	for in, want := range map[string][2]string{
		"system:serviceaccount:default:sleep": {"default", "sleep"},
		"system:serviceaccount:default":       {"", ""},
		"system:serviceaccount::x":            {"", ""},
		"system:node:worker-1":                {"", ""},
		"alice":                               {"", ""},
	} {
		ns, sa := parseServiceAccount(in)
		if ns != want[0] || sa != want[1] {
			t.Errorf("parseServiceAccount(%q) = %q, %q; want %q", in, ns, sa, want)
		}
	}
}
