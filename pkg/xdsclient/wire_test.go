package xdsclient

import (
	"bytes"
	"fmt"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/ambient-mesh/ambient/api/xds"
)

// The client speaks envoy's delta xDS with api/xds's messages. These tests
// hold them against go-control-plane's generated ones, which only tests may
// link (ztunnel's deps_test keeps go-control-plane out of its binary).

// envoyTwins maps each api/xds message to the envoy message it stands for.
var envoyTwins = []struct{ ours, envoy proto.Message }{
	{&xds.DeltaDiscoveryRequest{}, &discoveryv3.DeltaDiscoveryRequest{}},
	{&xds.DeltaDiscoveryResponse{}, &discoveryv3.DeltaDiscoveryResponse{}},
	{&xds.Resource{}, &discoveryv3.Resource{}},
	{&xds.Node{}, &corev3.Node{}},
	{&xds.Status{}, &statuspb.Status{}},
}

// twinOf returns the full name of the envoy message for one of ours; a
// message outside api/xds (a well-known type) is its own twin.
func twinOf(md protoreflect.MessageDescriptor) protoreflect.FullName {
	for _, tw := range envoyTwins {
		if tw.ours.ProtoReflect().Descriptor().FullName() == md.FullName() {
			return tw.envoy.ProtoReflect().Descriptor().FullName()
		}
	}
	return md.FullName()
}

// wireFill bounds how deep fillAll recurses; envoy's messages nest deeply
// and Struct is recursive.
const wireFill = 4

func TestEveryAPIXDSMessageHasAnEnvoyTwin(t *testing.T) {
	mds := xds.File_xds_xds_proto.Messages()
	for i := 0; i < mds.Len(); i++ {
		if twinOf(mds.Get(i)) == mds.Get(i).FullName() {
			t.Errorf("%s is not in envoyTwins, so nothing checks it against envoy's", mds.Get(i).FullName())
		}
	}
}

func TestTheStreamIsEnvoysDeltaADSMethod(t *testing.T) {
	if got, want := xds.DeltaAggregatedResourcesMethod, discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResources_FullMethodName; got != want {
		t.Errorf("method path %q, want go-control-plane's %q", got, want)
	}
}

func TestEveryFieldHasEnvoysNameNumberAndType(t *testing.T) {
	for _, tw := range envoyTwins {
		ours, envoy := tw.ours.ProtoReflect().Descriptor(), tw.envoy.ProtoReflect().Descriptor()
		for i := 0; i < ours.Fields().Len(); i++ {
			f := ours.Fields().Get(i)
			t.Run(string(f.FullName()), func(t *testing.T) {
				ef := envoy.Fields().ByName(f.Name())
				if ef == nil {
					t.Fatalf("%s has no field %s", envoy.FullName(), f.Name())
				}
				if f.Number() != ef.Number() {
					t.Errorf("number %d, envoy's is %d", f.Number(), ef.Number())
				}
				if f.Kind() != ef.Kind() || f.Cardinality() != ef.Cardinality() || f.IsMap() != ef.IsMap() {
					t.Errorf("type %v %v (map %v), envoy's is %v %v (map %v)",
						f.Cardinality(), f.Kind(), f.IsMap(), ef.Cardinality(), ef.Kind(), ef.IsMap())
				}
				if (f.ContainingOneof() == nil) != (ef.ContainingOneof() == nil) {
					t.Errorf("in a oneof: %v, envoy's: %v", f.ContainingOneof() != nil, ef.ContainingOneof() != nil)
				}
				if f.IsMap() {
					if f.MapKey().Kind() != ef.MapKey().Kind() || f.MapValue().Kind() != ef.MapValue().Kind() {
						t.Errorf("map<%v, %v>, envoy's is map<%v, %v>",
							f.MapKey().Kind(), f.MapValue().Kind(), ef.MapKey().Kind(), ef.MapValue().Kind())
					}
				} else if f.Message() != nil && twinOf(f.Message()) != ef.Message().FullName() {
					t.Errorf("message %s stands for %s, envoy's field is %s", f.Message().FullName(), twinOf(f.Message()), ef.Message().FullName())
				}
			})
		}
	}
}

func TestOurMessagesDecodeAsEnvoysWithEveryField(t *testing.T) {
	for _, tw := range envoyTwins {
		{
			t.Run(string(tw.ours.ProtoReflect().Descriptor().Name()), func(t *testing.T) {
				ours := tw.ours.ProtoReflect().New()
				fillAll(ours, 0, wireFill) // api/xds has no oneofs
				b, err := proto.MarshalOptions{Deterministic: true}.Marshal(ours.Interface())
				if err != nil {
					t.Fatal(err)
				}
				envoy := tw.envoy.ProtoReflect().New()
				if err := proto.Unmarshal(b, envoy.Interface()); err != nil {
					t.Fatalf("envoy's %s cannot decode ours: %v", envoy.Descriptor().FullName(), err)
				}
				if n := unknownBytes(envoy); n > 0 {
					t.Errorf("envoy's %s found %d bytes of fields it does not know", envoy.Descriptor().FullName(), n)
				}
				sameByName(t, string(ours.Descriptor().Name()), ours, envoy)

				back := tw.ours.ProtoReflect().New().Interface()
				b, err = proto.Marshal(envoy.Interface())
				if err != nil {
					t.Fatal(err)
				}
				if err := proto.Unmarshal(b, back); err != nil {
					t.Fatal(err)
				}
				if !proto.Equal(back, ours.Interface()) {
					t.Errorf("through envoy's message and back:\n got %v\nwant %v", back, ours)
				}
			})
		}
	}
}

func TestEnvoysMessagesDecodeAsOursKeepingWhatWeLeaveOut(t *testing.T) {
	for _, tw := range envoyTwins {
		for variant := range 3 {
			t.Run(fmt.Sprintf("%s variant %d", tw.envoy.ProtoReflect().Descriptor().FullName(), variant), func(t *testing.T) {
				envoy := tw.envoy.ProtoReflect().New()
				fillAll(envoy, variant, wireFill)
				b, err := proto.MarshalOptions{Deterministic: true}.Marshal(envoy.Interface())
				if err != nil {
					t.Fatal(err)
				}
				ours := tw.ours.ProtoReflect().New()
				if err := proto.Unmarshal(b, ours.Interface()); err != nil {
					t.Fatalf("our %s cannot decode envoy's: %v", ours.Descriptor().FullName(), err)
				}
				sameByName(t, string(ours.Descriptor().Name()), ours, envoy)

				// What we leave out is kept as unknown fields and written back
				// as it came.
				b, err = proto.Marshal(ours.Interface())
				if err != nil {
					t.Fatal(err)
				}
				back := tw.envoy.ProtoReflect().New().Interface()
				if err := proto.Unmarshal(b, back); err != nil {
					t.Fatal(err)
				}
				if !proto.Equal(back, envoy.Interface()) {
					t.Errorf("through our message and back:\n got %v\nwant %v", back, envoy)
				}
			})
		}
	}
}

// sameByName checks that every field of ours holds the value of envoy's field
// of the same name, descending into the messages of both.
func sameByName(t *testing.T, path string, ours, envoy protoreflect.Message) {
	t.Helper()
	fields := ours.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		f := fields.Get(i)
		ef := envoy.Descriptor().Fields().ByName(f.Name())
		p := path + "." + string(f.Name())
		if ef == nil || ef.Kind() != f.Kind() || ef.IsMap() != f.IsMap() {
			t.Errorf("%s: envoy has no such field of this type", p)
			continue
		}
		if ours.Has(f) != envoy.Has(ef) {
			t.Errorf("%s: set %v, envoy's set %v", p, ours.Has(f), envoy.Has(ef))
			continue
		}
		switch {
		case f.IsMap():
			om, em := ours.Get(f).Map(), envoy.Get(ef).Map()
			if om.Len() != em.Len() {
				t.Errorf("%s: %d entries, envoy's %d", p, om.Len(), em.Len())
			}
			om.Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
				sameValue(t, fmt.Sprintf("%s[%v]", p, k), f.MapValue(), v, em.Get(k))
				return true
			})
		case f.IsList():
			ol, el := ours.Get(f).List(), envoy.Get(ef).List()
			if ol.Len() != el.Len() {
				t.Errorf("%s: %d elements, envoy's %d", p, ol.Len(), el.Len())
				continue
			}
			for j := 0; j < ol.Len(); j++ {
				sameValue(t, fmt.Sprintf("%s[%d]", p, j), f, ol.Get(j), el.Get(j))
			}
		default:
			sameValue(t, p, f, ours.Get(f), envoy.Get(ef))
		}
	}
}

// sameValue compares one value of field f (a list element or map value).
func sameValue(t *testing.T, path string, f protoreflect.FieldDescriptor, ours, envoy protoreflect.Value) {
	t.Helper()
	switch {
	case f.Message() != nil && twinOf(f.Message()) != f.Message().FullName():
		sameByName(t, path, ours.Message(), envoy.Message())
	case f.Message() != nil: // a well-known type on both sides
		if !proto.Equal(ours.Message().Interface(), envoy.Message().Interface()) {
			t.Errorf("%s: %v, envoy's %v", path, ours.Message().Interface(), envoy.Message().Interface())
		}
	case f.Kind() == protoreflect.BytesKind:
		if !bytes.Equal(ours.Bytes(), envoy.Bytes()) {
			t.Errorf("%s: %x, envoy's %x", path, ours.Bytes(), envoy.Bytes())
		}
	default:
		if ours.Interface() != envoy.Interface() {
			t.Errorf("%s: %v, envoy's %v", path, ours, envoy)
		}
	}
}

// unknownBytes counts the unknown-field bytes of m and every message in it.
func unknownBytes(m protoreflect.Message) int {
	n := len(m.GetUnknown())
	m.Range(func(f protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case f.IsMap():
			if f.MapValue().Message() != nil {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					n += unknownBytes(mv.Message())
					return true
				})
			}
		case f.IsList():
			if f.Message() != nil {
				for i := 0; i < v.List().Len(); i++ {
					n += unknownBytes(v.List().Get(i).Message())
				}
			}
		case f.Message() != nil:
			n += unknownBytes(v.Message())
		}
		return true
	})
	return n
}

// fillAll sets every field of m, down to depth levels of messages, to a value
// that differs by field number, with two elements in each list and map. In
// each oneof it sets the member at index variant (modulo the oneof's size).
func fillAll(m protoreflect.Message, variant, depth int) {
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		f := fields.Get(i)
		if oo := f.ContainingOneof(); oo != nil && !oo.IsSynthetic() && oo.Fields().Get(variant%oo.Fields().Len()) != f {
			continue
		}
		valueMsg := f.Message()
		if f.IsMap() {
			valueMsg = f.MapValue().Message()
		}
		if valueMsg != nil && depth == 0 {
			continue
		}
		switch {
		case f.IsMap():
			mp := m.Mutable(f).Map()
			for k := range 2 {
				v := mp.NewValue()
				if valueMsg != nil {
					fillAll(v.Message(), variant, depth-1)
				} else {
					v = scalarOf(f.MapValue(), k)
				}
				mp.Set(scalarOf(f.MapKey(), k).MapKey(), v)
			}
		case f.IsList():
			l := m.Mutable(f).List()
			for k := range 2 {
				if valueMsg != nil {
					v := l.NewElement()
					fillAll(v.Message(), variant, depth-1)
					l.Append(v)
				} else {
					l.Append(scalarOf(f, k))
				}
			}
		case valueMsg != nil:
			fillAll(m.Mutable(f).Message(), variant, depth-1)
		default:
			m.Set(f, scalarOf(f, 0))
		}
	}
}

// scalarOf returns a non-default value of a scalar or enum field; k tells
// apart the elements of a list or the keys of a map.
func scalarOf(f protoreflect.FieldDescriptor, k int) protoreflect.Value {
	n := int64(f.Number())
	switch f.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(k%2 == 0)
	case protoreflect.EnumKind:
		values := f.Enum().Values()
		return protoreflect.ValueOfEnum(values.Get((1 + k) % values.Len()).Number())
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
		return protoreflect.ValueOfString(fmt.Sprintf("%s-%d", f.Name(), k))
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte{byte(n), byte(k), 0xff})
	}
	panic(fmt.Sprintf("scalarOf: %v", f.Kind()))
}
