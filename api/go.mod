module github.com/ambient-mesh/ambient/api

go 1.26.0
