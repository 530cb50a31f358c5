package agent

import (
	"encoding/json"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Paths served on Config.DebugAddr.
const (
	PathDebugEnrolled = "/debug/enrolled"
	PathDebugZDS      = "/debug/zds"
	PathReady         = "/healthz/ready"
)

// EnrolledReport is the body of /debug/enrolled.
type EnrolledReport struct {
	Node   string `json:"node"`
	Engine string `json:"engine"`
	// ProbeSNAT is the node's probe SNAT table (redirect.DescribeProbeSNAT).
	ProbeSNAT      any           `json:"probeSNAT,omitempty"`
	ProbeSNATError string        `json:"probeSNATError,omitempty"`
	Pods           []EnrolledPod `json:"pods"`
}

// EnrolledPod is one enrolled pod in EnrolledReport.
type EnrolledPod struct {
	UID        string       `json:"uid"`
	Namespace  string       `json:"namespace"`
	Name       string       `json:"name"`
	IPs        []netip.Addr `json:"ips"`
	NetnsInode uint64       `json:"netnsInode"`
	Sandbox    string       `json:"sandbox,omitempty"`
	Via        string       `json:"via"`
	Since      time.Time    `json:"since"`
	// Redirection is the engine's Describe report of the pod's netns.
	Redirection      any    `json:"redirection,omitempty"`
	RedirectionError string `json:"redirectionError,omitempty"`
}

// ZDSReport is the body of /debug/zds.
type ZDSReport struct {
	Socket    string   `json:"socket"`
	Connected int      `json:"connected"`
	Workloads []string `json:"workloads"`
}

func (a *Agent) debugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathReady, func(w http.ResponseWriter, _ *http.Request) {
		if !a.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	mux.HandleFunc("GET "+PathDebugEnrolled, func(w http.ResponseWriter, _ *http.Request) {
		writeDebugJSON(w, a.enrolledReport())
	})
	mux.HandleFunc("GET "+PathDebugZDS, func(w http.ResponseWriter, _ *http.Request) {
		writeDebugJSON(w, ZDSReport{Socket: a.zds.Path(), Connected: a.zds.Connected(), Workloads: a.zds.Workloads()})
	})
	return mux
}

func (a *Agent) enrolledReport() EnrolledReport {
	rep := EnrolledReport{Node: a.cfg.NodeName, Engine: a.engine.Name(), Pods: []EnrolledPod{}}
	if snat, err := a.probes.Describe(); err != nil {
		rep.ProbeSNATError = err.Error()
	} else {
		rep.ProbeSNAT = snat
	}
	a.mu.Lock()
	uids := make([]string, 0, len(a.pods))
	for uid := range a.pods {
		uids = append(uids, uid)
	}
	a.mu.Unlock()
	for _, uid := range uids {
		// The pod's lock keeps its netns descriptor open while the engine
		// reads through it.
		unlock := a.locks.Lock(uid)
		p := a.enrolled(uid)
		if p == nil {
			unlock()
			continue
		}
		e := EnrolledPod{
			UID: p.uid, Namespace: p.namespace, Name: p.name, IPs: p.ips,
			NetnsInode: p.inode, Sandbox: p.sandbox, Via: p.via, Since: p.since,
		}
		if r, err := a.engine.Describe(p.netnsPath(), p.redirectPod()); err != nil {
			e.RedirectionError = err.Error()
		} else {
			e.Redirection = r
		}
		unlock()
		rep.Pods = append(rep.Pods, e)
	}
	slices.SortFunc(rep.Pods, func(x, y EnrolledPod) int {
		if c := strings.Compare(x.Namespace, y.Namespace); c != 0 {
			return c
		}
		return strings.Compare(x.Name, y.Name)
	})
	return rep
}

func writeDebugJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
