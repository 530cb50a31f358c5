// Package workloadapi holds the workload discovery wire types (package
// istio.workload): the Address resource, a Workload or a Service, that the
// control plane serves to ztunnel and waypoints over delta xDS.
package workloadapi

// AddressTypeURL is the delta xDS resource type URL of Address.
const AddressTypeURL = "type.googleapis.com/istio.workload.Address"
