module github.com/ambient-mesh/ambient/cni-plugin

go 1.26.0
