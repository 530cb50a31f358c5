package kubeletapi

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Cache lifetimes of webhook answers, the kubelet's defaults
// (authentication.webhook.cacheTTL, authorization.webhook.cacheAuthorizedTTL
// and cacheUnauthorizedTTL).
const (
	tokenCacheTTL        = 2 * time.Minute
	tokenFailureCacheTTL = 10 * time.Second
	allowedCacheTTL      = 5 * time.Minute
	deniedCacheTTL       = 30 * time.Second
)

// maxCacheEntries bounds each answer cache; past it the cache starts afresh.
const maxCacheEntries = 4096

// reviewTimeout bounds one TokenReview or SubjectAccessReview call.
const reviewTimeout = 10 * time.Second

// userInfo is an authenticated requester.
type userInfo struct {
	Name   string
	UID    string
	Groups []string
	Extra  map[string][]string
}

// authorizer authenticates and authorizes requests the way a kubelet with
// webhook authentication and authorization does.
type authorizer struct {
	client   kubernetes.Interface
	nodeName string
	tokens   ttlCache[userInfo] // token -> user; zero Name caches a rejected token
	sars     ttlCache[bool]     // SubjectAccessReview spec JSON -> allowed
}

func newAuthorizer(c kubernetes.Interface, nodeName string) *authorizer {
	return &authorizer{client: c, nodeName: nodeName}
}

// wrap returns next behind authentication and authorization.
func (a *authorizer) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, ok, err := a.authenticate(r)
		if err != nil {
			slog.Error("kubelet API authentication", "err", err)
			http.Error(w, "Unauthorized: authentication error\n", http.StatusUnauthorized)
			return
		}
		if !ok {
			http.Error(w, "Unauthorized\n", http.StatusUnauthorized)
			return
		}
		verb := apiVerb(r.Method)
		subresources := subresourcesFor(r.URL.Path)
		for _, sub := range subresources {
			allowed, err := a.authorize(r.Context(), u, verb, sub)
			if err != nil {
				slog.Error("kubelet API authorization", "user", u.Name, "verb", verb, "subresource", sub, "err", err)
				http.Error(w, fmt.Sprintf("Authorization error (user=%s, verb=%s, resource=nodes, subresource=%s)\n", u.Name, verb, sub), http.StatusInternalServerError)
				return
			}
			if allowed {
				next.ServeHTTP(w, r)
				return
			}
		}
		http.Error(w, fmt.Sprintf("Forbidden (user=%s, verb=%s, resource=nodes, subresource(s)=%v)\n", u.Name, verb, subresources), http.StatusForbidden)
	})
}

// authenticate finds the requester: a verified client certificate first (user
// = CN, groups = O), then a bearer token checked by TokenReview. ok is false
// for an anonymous or rejected request.
func (a *authorizer) authenticate(r *http.Request) (u userInfo, ok bool, err error) {
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		leaf := r.TLS.VerifiedChains[0][0]
		if leaf.Subject.CommonName != "" {
			return userInfo{Name: leaf.Subject.CommonName, Groups: slices.Clone(leaf.Subject.Organization)}, true, nil
		}
	}
	token, found := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	token = strings.TrimSpace(token)
	if !found || token == "" {
		return userInfo{}, false, nil
	}
	if u, hit := a.tokens.get(token); hit {
		return u, u.Name != "", nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), reviewTimeout)
	defer cancel()
	tr, err := a.client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token},
	}, metav1.CreateOptions{})
	if err != nil {
		return userInfo{}, false, fmt.Errorf("creating TokenReview: %w", err)
	}
	if !tr.Status.Authenticated || tr.Status.User.Username == "" {
		a.tokens.put(token, userInfo{}, tokenFailureCacheTTL)
		return userInfo{}, false, nil
	}
	u = userInfo{Name: tr.Status.User.Username, UID: tr.Status.User.UID, Groups: tr.Status.User.Groups}
	if len(tr.Status.User.Extra) > 0 {
		u.Extra = map[string][]string{}
		for k, v := range tr.Status.User.Extra {
			u.Extra[k] = v
		}
	}
	a.tokens.put(token, u, tokenCacheTTL)
	return u, true, nil
}

// authorize asks whether u may verb the node's subresource.
func (a *authorizer) authorize(ctx context.Context, u userInfo, verb, subresource string) (bool, error) {
	spec := authorizationv1.SubjectAccessReviewSpec{
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Verb:        verb,
			Group:       "",
			Version:     "v1",
			Resource:    "nodes",
			Subresource: subresource,
			Name:        a.nodeName,
		},
		User:   u.Name,
		UID:    u.UID,
		Groups: u.Groups,
	}
	for k, v := range u.Extra {
		if spec.Extra == nil {
			spec.Extra = map[string]authorizationv1.ExtraValue{}
		}
		spec.Extra[k] = v
	}
	key, err := json.Marshal(spec)
	if err != nil {
		return false, fmt.Errorf("encoding SubjectAccessReview: %w", err)
	}
	if allowed, hit := a.sars.get(string(key)); hit {
		return allowed, nil
	}
	ctx, cancel := context.WithTimeout(ctx, reviewTimeout)
	defer cancel()
	sar, err := a.client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		return false, fmt.Errorf("creating SubjectAccessReview: %w", err)
	}
	allowed := sar.Status.Allowed && !sar.Status.Denied
	ttl := deniedCacheTTL
	if allowed {
		ttl = allowedCacheTTL
	}
	a.sars.put(string(key), allowed, ttl)
	return allowed, nil
}

// apiVerb maps an HTTP method to the verb the kubelet authorizes; upgrade
// requests (exec, port-forward) are GET or POST and so get or create.
func apiVerb(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead:
		return "get"
	case http.MethodPost:
		return "create"
	case http.MethodPut:
		return "update"
	case http.MethodPatch:
		return "patch"
	case http.MethodDelete:
		return "delete"
	}
	return ""
}

// subresourcesFor lists the node subresources a request path is authorized
// on, any one of which allows it: the kubelet's (v1.36, fine-grained authz)
// mapping, whose default is "proxy".
func subresourcesFor(path string) []string {
	var subs []string
	switch {
	case isSubpath(path, "/pods"), isSubpath(path, "/runningpods"):
		subs = append(subs, "pods")
	case isSubpath(path, "/healthz"):
		subs = append(subs, "healthz")
	case isSubpath(path, "/configz"):
		subs = append(subs, "configz")
	}
	switch {
	case isSubpath(path, "/stats"):
		subs = append(subs, "stats")
	case isSubpath(path, "/metrics"):
		subs = append(subs, "metrics")
	case isSubpath(path, "/logs"):
		subs = append(subs, "log")
	case isSubpath(path, "/checkpoint"):
		subs = append(subs, "checkpoint")
	case isSubpath(path, "/statusz"):
		subs = append(subs, "statusz")
	case isSubpath(path, "/flagz"):
		subs = append(subs, "configz")
	default:
		subs = append(subs, "proxy")
	}
	return subs
}

// isSubpath reports whether subpath is path or below it.
func isSubpath(subpath, path string) bool {
	path = strings.TrimSuffix(path, "/")
	return subpath == path || (strings.HasPrefix(subpath, path) && subpath[len(path)] == '/')
}

// ttlCache is a small map whose entries expire.
type ttlCache[V any] struct {
	mu sync.Mutex
	m  map[string]ttlEntry[V] // guarded by mu
}

type ttlEntry[V any] struct {
	v       V
	expires time.Time
}

func (c *ttlCache[V]) get(k string) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	if !ok || time.Now().After(e.expires) {
		var zero V
		return zero, false
	}
	return e.v, true
}

func (c *ttlCache[V]) put(k string, v V, ttl time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxCacheEntries {
		c.m = map[string]ttlEntry[V]{}
	}
	c.m[k] = ttlEntry[V]{v: v, expires: time.Now().Add(ttl)}
}
