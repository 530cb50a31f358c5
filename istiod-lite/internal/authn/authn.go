// Package authn authenticates gRPC callers of the control plane by the
// Kubernetes service-account token they present as a bearer token, using the
// TokenReview API, and caches the verdicts so that a busy ztunnel does not
// turn every request into an API-server round trip.
package authn

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"google.golang.org/grpc/metadata"
)

// DefaultAudience is the audience of the projected token ztunnel and the
// waypoints present to the CA and to xDS (Istio's convention).
const DefaultAudience = "istio-ca"

// Extra keys the API server puts into a TokenReview of a bound (projected)
// service-account token.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

// serviceAccountPrefix starts the user name of every service account:
// system:serviceaccount:<namespace>:<name>.
const serviceAccountPrefix = "system:serviceaccount:"

const (
	// maxSuccessTTL caps how long an accepted token is trusted without asking
	// the API server again, so a deleted pod or service account stops working
	// soon even though its token has not expired.
	maxSuccessTTL = 5 * time.Minute
	// expiryMargin stops trusting a cached token this long before its exp.
	expiryMargin = 30 * time.Second
	// failureTTL is how long a rejection is remembered, which keeps a caller
	// that retries a bad token in a loop from hammering the API server.
	failureTTL = 10 * time.Second
	// defaultCacheSize bounds the number of cached verdicts.
	defaultCacheSize = 4096
	// maxTokenBytes rejects absurd tokens before hashing or sending them.
	maxTokenBytes = 64 << 10
	// reviewTimeout bounds one TokenReview call.
	reviewTimeout = 10 * time.Second
)

// ErrUnauthenticated is wrapped by every error Authenticate returns.
var ErrUnauthenticated = errors.New("unauthenticated")

// The distinct reasons Authenticate fails; each wraps ErrUnauthenticated.
var (
	// ErrNoToken: the request carries no usable "authorization: Bearer" header.
	ErrNoToken = fmt.Errorf("%w: no bearer token", ErrUnauthenticated)
	// ErrTokenRejected: the API server reviewed the token and did not accept
	// it (wrong audience, expired, unknown or deleted service account, ...).
	// The error text carries the API server's reason.
	ErrTokenRejected = fmt.Errorf("%w: token rejected", ErrUnauthenticated)
	// ErrReviewFailed: the TokenReview itself could not be done (API server
	// unreachable, forbidden, ...). It says nothing about the token.
	ErrReviewFailed = fmt.Errorf("%w: token review failed", ErrUnauthenticated)
)

// Identity is what an accepted token says about its bearer.
type Identity struct {
	Username string
	Groups   []string
	// ServiceAccount and Namespace are set when the token belongs to a
	// service account.
	ServiceAccount, Namespace string
	// PodName, PodUID and NodeName are set for bound tokens projected into a
	// pod (the API server records the pod and its node in the token).
	PodName, PodUID, NodeName string
}

// Authenticator checks bearer tokens with TokenReview for a set of audiences.
// It is safe for concurrent use.
type Authenticator struct {
	client    kubernetes.Interface
	audiences []string
	now       func() time.Time // replaced in tests
	maxSize   int

	mu sync.Mutex
	// cache holds verdicts by token hash; guarded by mu.
	cache map[[sha256.Size]byte]cacheEntry
	// inflight de-duplicates concurrent reviews of the same token; guarded by mu.
	inflight map[[sha256.Size]byte]*review
}

type cacheEntry struct {
	id      Identity
	err     error // non-nil for a cached rejection
	expires time.Time
}

// review is one TokenReview in progress; done is closed when id and err are set.
type review struct {
	done chan struct{}
	id   Identity
	err  error
}

// NewAuthenticator returns an Authenticator that accepts tokens valid for any
// of audiences (DefaultAudience when empty).
func NewAuthenticator(c kubernetes.Interface, audiences []string) *Authenticator {
	if len(audiences) == 0 {
		audiences = []string{DefaultAudience}
	}
	return &Authenticator{
		client:    c,
		audiences: append([]string(nil), audiences...),
		now:       time.Now,
		maxSize:   defaultCacheSize,
		cache:     make(map[[sha256.Size]byte]cacheEntry),
		inflight:  make(map[[sha256.Size]byte]*review),
	}
}

// Authenticate reads the bearer token from the incoming gRPC metadata of ctx
// and returns the identity the API server vouches for. Errors wrap
// ErrUnauthenticated and one of ErrNoToken, ErrTokenRejected, ErrReviewFailed;
// they never contain the token.
func (a *Authenticator) Authenticate(ctx context.Context) (Identity, error) {
	token, err := bearerToken(ctx)
	if err != nil {
		return Identity{}, err
	}
	return a.AuthenticateToken(ctx, token)
}

// AuthenticateToken is Authenticate for a token obtained some other way.
func (a *Authenticator) AuthenticateToken(ctx context.Context, token string) (Identity, error) {
	key := sha256.Sum256([]byte(token))
	now := a.now()

	a.mu.Lock()
	if e, ok := a.cache[key]; ok {
		if now.Before(e.expires) {
			a.mu.Unlock()
			return e.id, e.err
		}
		delete(a.cache, key)
	}
	if r, ok := a.inflight[key]; ok {
		a.mu.Unlock()
		select {
		case <-r.done:
			return r.id, r.err
		case <-ctx.Done():
			return Identity{}, fmt.Errorf("%w: %w", ErrReviewFailed, ctx.Err())
		}
	}
	r := &review{done: make(chan struct{})}
	a.inflight[key] = r
	a.mu.Unlock()

	// The review runs detached from ctx so that one impatient caller does not
	// fail the others waiting on the same token.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reviewTimeout)
	r.id, r.err = a.review(rctx, token)
	cancel()

	a.mu.Lock()
	delete(a.inflight, key)
	switch {
	case r.err == nil:
		a.storeLocked(key, cacheEntry{id: r.id, expires: successExpiry(token, now)})
	case errors.Is(r.err, ErrTokenRejected):
		a.storeLocked(key, cacheEntry{err: r.err, expires: now.Add(failureTTL)})
	}
	// ErrReviewFailed is not cached: it says nothing about the token.
	a.mu.Unlock()
	close(r.done)
	return r.id, r.err
}

// storeLocked adds e to the cache, making room first when it is full.
func (a *Authenticator) storeLocked(key [sha256.Size]byte, e cacheEntry) {
	if !e.expires.After(a.now()) {
		return
	}
	if len(a.cache) >= a.maxSize {
		now := a.now()
		for k, old := range a.cache {
			if !now.Before(old.expires) {
				delete(a.cache, k)
			}
		}
		// Still full of live entries: drop arbitrary ones (map order is random).
		for k := range a.cache {
			if len(a.cache) < a.maxSize {
				break
			}
			delete(a.cache, k)
		}
	}
	a.cache[key] = e
}

func (a *Authenticator) review(ctx context.Context, token string) (Identity, error) {
	tr := &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: a.audiences},
	}
	res, err := a.client.AuthenticationV1().TokenReviews().Create(ctx, tr, metav1.CreateOptions{})
	if err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrReviewFailed, err)
	}
	st := res.Status
	if !st.Authenticated {
		reason := st.Error
		if reason == "" {
			reason = "not authenticated"
		}
		return Identity{}, fmt.Errorf("%w: %s", ErrTokenRejected, reason)
	}
	// An audience-aware API server echoes the audiences it matched; an empty
	// or disjoint list means the token was not checked against ours.
	if !intersects(st.Audiences, a.audiences) {
		return Identity{}, fmt.Errorf("%w: token audiences %q do not include any of %q", ErrTokenRejected, st.Audiences, a.audiences)
	}
	if st.User.Username == "" {
		return Identity{}, fmt.Errorf("%w: review returned no user name", ErrTokenRejected)
	}
	id := Identity{
		Username: st.User.Username,
		Groups:   append([]string(nil), st.User.Groups...),
		PodName:  firstExtra(st.User.Extra, extraPodName),
		PodUID:   firstExtra(st.User.Extra, extraPodUID),
		NodeName: firstExtra(st.User.Extra, extraNodeName),
	}
	id.Namespace, id.ServiceAccount = parseServiceAccount(st.User.Username)
	return id, nil
}

// bearerToken returns the token of the first "authorization" metadata value.
func bearerToken(ctx context.Context) (string, error) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return "", fmt.Errorf("%w: request has no metadata", ErrNoToken)
	}
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return "", fmt.Errorf("%w: missing authorization header", ErrNoToken)
	}
	scheme, token, ok := strings.Cut(strings.TrimSpace(vals[0]), " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return "", fmt.Errorf("%w: authorization header is not a bearer token", ErrNoToken)
	}
	token = strings.TrimSpace(token)
	switch {
	case token == "":
		return "", fmt.Errorf("%w: empty bearer token", ErrNoToken)
	case len(token) > maxTokenBytes:
		return "", fmt.Errorf("%w: bearer token longer than %d bytes", ErrNoToken, maxTokenBytes)
	}
	return token, nil
}

// successExpiry is when an accepted token stops being trusted from cache:
// shortly before its exp, and never later than maxSuccessTTL from now.
func successExpiry(token string, now time.Time) time.Time {
	limit := now.Add(maxSuccessTTL)
	if exp, ok := jwtExpiry(token); ok {
		if e := exp.Add(-expiryMargin); e.Before(limit) {
			return e
		}
	}
	return limit
}

// jwtExpiry reads the exp claim of a JWT without verifying anything; it only
// ever shortens how long a verdict of the API server is cached.
func jwtExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	f, err := claims.Exp.Float64()
	if err != nil {
		return time.Time{}, false
	}
	return time.Unix(int64(f), 0), true
}

// parseServiceAccount splits system:serviceaccount:<ns>:<name>.
func parseServiceAccount(username string) (namespace, name string) {
	rest, ok := strings.CutPrefix(username, serviceAccountPrefix)
	if !ok {
		return "", ""
	}
	ns, sa, ok := strings.Cut(rest, ":")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, ":") {
		return "", ""
	}
	return ns, sa
}

func firstExtra(extra map[string]authenticationv1.ExtraValue, key string) string {
	if v := extra[key]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func intersects(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}
