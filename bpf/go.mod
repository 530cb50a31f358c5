module github.com/ambient-mesh/ambient/bpf

go 1.26.0
