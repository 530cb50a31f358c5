module github.com/ambient-mesh/ambient/waypoint

go 1.26.0
