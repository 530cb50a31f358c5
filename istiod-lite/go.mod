module github.com/ambient-mesh/ambient/istiod-lite

go 1.26.0
