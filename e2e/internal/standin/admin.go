package standin

import (
	"encoding/json"
	"net/http"
)

// adminHandler serves, on the node's loopback:
//
//	/workloads      JSON list of WorkloadStatus, sorted by uid
//	/zds            JSON ZDSStatus
//	/healthz/ready  200 once connected to the agent and its snapshot is in, else 503
func (s *StandIn) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /workloads", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, s.Workloads())
	})
	mux.HandleFunc("GET /zds", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, s.ZDS())
	})
	mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		switch {
		case s.ready.Load():
			w.Write([]byte("ready\n"))
		case s.connected.Load():
			http.Error(w, "not ready: waiting for the agent's snapshot", http.StatusServiceUnavailable)
		default:
			http.Error(w, "not ready: not connected to the agent", http.StatusServiceUnavailable)
		}
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
