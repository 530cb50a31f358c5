// Package echopb holds the gRPC API of the e2e echo server, generated from
// echo.proto. Regenerate from the e2e module directory with
//
//	protoc --proto_path=. --go_out=. --go_opt=paths=source_relative \
//	  --go-grpc_out=. --go-grpc_opt=paths=source_relative internal/echopb/echo.proto
//
// using protoc 3.21.12, protoc-gen-go v1.36.12 and protoc-gen-go-grpc v1.6.2.
package echopb
