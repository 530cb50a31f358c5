package api_test

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/ambient-mesh/ambient/api/ca"
	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/api/xds"
	"github.com/ambient-mesh/ambient/api/zds"
)

// generatedFiles are the descriptors of every .proto in this module.
// TestEveryProtoFileIsRoundTripped keeps the list complete.
var generatedFiles = []protoreflect.FileDescriptor{
	workloadapi.File_workloadapi_workload_proto,
	security.File_security_authorization_proto,
	zds.File_zds_zds_proto,
	ca.File_ca_ca_proto,
	xds.File_xds_xds_proto,
}

// fillDepth bounds how deep fill recurses into nested messages; the
// recursive well-known types (Struct, Value) would otherwise never end.
const fillDepth = 4

func TestEveryProtoFileIsRoundTripped(t *testing.T) {
	listed := map[string]bool{}
	for _, fd := range generatedFiles {
		listed[fd.Path()] = true
	}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || filepath.Ext(path) != ".proto" {
			return nil
		}
		if !listed[filepath.ToSlash(path)] {
			t.Errorf("%s is not in generatedFiles, so it is not round-trip tested", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestEveryMessageRoundTripsWithEveryFieldSet(t *testing.T) {
	for _, file := range generatedFiles {
		for _, md := range allMessages(file.Messages()) {
			variants := 1
			for i := 0; i < md.Oneofs().Len(); i++ {
				variants = max(variants, md.Oneofs().Get(i).Fields().Len())
			}
			set := map[protoreflect.FieldNumber]bool{}
			for v := range variants {
				t.Run(fmt.Sprintf("%s variant %d survives marshal and unmarshal", md.FullName(), v), func(t *testing.T) {
					msg := newMessage(t, md)
					fill(msg.ProtoReflect(), v, fillDepth)
					msg.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
						set[fd.Number()] = true
						return true
					})

					b, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
					if err != nil {
						t.Fatalf("marshal: %v", err)
					}
					got := newMessage(t, md)
					if err := proto.Unmarshal(b, got); err != nil {
						t.Fatalf("unmarshal: %v", err)
					}
					if !proto.Equal(msg, got) {
						t.Errorf("round trip changed the message:\n sent %v\n  got %v", msg, got)
					}
					if unknown := got.ProtoReflect().GetUnknown(); len(unknown) > 0 {
						t.Errorf("round trip left %d bytes of unknown fields", len(unknown))
					}
				})
			}
			t.Run(fmt.Sprintf("%s has every field set by some variant", md.FullName()), func(t *testing.T) {
				for i := 0; i < md.Fields().Len(); i++ {
					if fd := md.Fields().Get(i); !set[fd.Number()] {
						t.Errorf("field %s (%d) was never set", fd.Name(), fd.Number())
					}
				}
			})
		}
	}
}

// allMessages lists messages and their nested messages, skipping the
// synthetic map entry types (maps are filled through their fields).
func allMessages(mds protoreflect.MessageDescriptors) []protoreflect.MessageDescriptor {
	var out []protoreflect.MessageDescriptor
	for i := 0; i < mds.Len(); i++ {
		md := mds.Get(i)
		if md.IsMapEntry() {
			continue
		}
		out = append(out, md)
		out = append(out, allMessages(md.Messages())...)
	}
	return out
}

// newMessage returns an empty message of the generated Go type for md.
func newMessage(t *testing.T, md protoreflect.MessageDescriptor) proto.Message {
	t.Helper()
	mt, err := protoregistry.GlobalTypes.FindMessageByName(md.FullName())
	if err != nil {
		t.Fatalf("%s has no generated Go type: %v", md.FullName(), err)
	}
	return mt.New().Interface()
}

// fill sets every field of m to a non-default value. For each oneof it sets
// the member at index variant (modulo the oneof's size).
func fill(m protoreflect.Message, variant, depth int) {
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if oo := fd.ContainingOneof(); oo != nil && !oo.IsSynthetic() {
			if oo.Fields().Get(variant%oo.Fields().Len()) != fd {
				continue
			}
		}
		isMessage := fd.Message() != nil && !fd.IsMap()
		if (isMessage || (fd.IsMap() && fd.MapValue().Message() != nil)) && depth == 0 {
			continue
		}
		switch {
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			for k := range 2 {
				key := scalar(fd.MapKey(), k).MapKey()
				if fd.MapValue().Message() != nil {
					v := mp.NewValue()
					fill(v.Message(), variant, depth-1)
					mp.Set(key, v)
				} else {
					mp.Set(key, scalar(fd.MapValue(), k))
				}
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			for k := range 2 {
				if fd.Message() != nil {
					v := l.NewElement()
					fill(v.Message(), variant, depth-1)
					l.Append(v)
				} else {
					l.Append(scalar(fd, k))
				}
			}
		case fd.Message() != nil:
			fill(m.Mutable(fd).Message(), variant, depth-1)
		default:
			m.Set(fd, scalar(fd, 0))
		}
	}
}

// scalar returns a non-default value for a scalar or enum field; k tells
// apart the elements of a list or the keys of a map. Numbers are chosen to
// need multi-byte varints and to exercise sign handling.
func scalar(fd protoreflect.FieldDescriptor, k int) protoreflect.Value {
	n := int64(fd.Number())
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(k%2 == 0)
	case protoreflect.EnumKind:
		values := fd.Enum().Values()
		if values.Len() == 1 {
			return protoreflect.ValueOfEnum(values.Get(0).Number())
		}
		return protoreflect.ValueOfEnum(values.Get(1 + k%(values.Len()-1)).Number())
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(-1000 - n - int64(k)))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(-(1 << 40) - n - int64(k))
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(1000 + n + int64(k)))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(1<<40 + n + int64(k)))
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(1.5 + float32(k))
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(2.25 + float64(k))
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(fmt.Sprintf("%s-%d", fd.Name(), k))
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte{byte(n), byte(k), 0xff})
	}
	panic(fmt.Sprintf("no value for field %s of kind %v", fd.FullName(), fd.Kind()))
}
