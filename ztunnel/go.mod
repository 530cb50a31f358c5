module github.com/ambient-mesh/ambient/ztunnel

go 1.26.0
