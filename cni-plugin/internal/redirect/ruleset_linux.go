package redirect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// ruleset is one nftables table as an installer writes it: built in memory,
// written in one batch, and rendered to text for golden tests and Describe.
// Reading a table back from the kernel yields the same shape, so what Describe
// shows is what the kernel holds, in the same notation as the golden files.
type ruleset struct {
	table  *nftables.Table
	sets   []setSpec
	chains []chainSpec
}

type setSpec struct {
	set   *nftables.Set
	elems []nftables.SetElement
}

type chainSpec struct {
	chain *nftables.Chain
	rules []ruleSpec
}

type ruleSpec struct {
	exprs   []expr.Any
	comment string
}

// replace writes rs in one netlink batch that also deletes any previous table of
// the same name, so a stale or partial table is replaced atomically and writing
// twice equals writing once. (The leading add makes the delete valid when no
// table exists yet; the kernel applies the whole batch or none of it.)
func (rs *ruleset) replace(c *nftables.Conn) error {
	c.AddTable(rs.table)
	c.DelTable(rs.table)
	c.AddTable(rs.table)
	for _, s := range rs.sets {
		s.set.Table = rs.table
		if err := c.AddSet(s.set, s.elems); err != nil {
			return fmt.Errorf("adding set %s: %w", s.set.Name, err)
		}
		// Lookups name the set; its batch ID lets the kernel resolve the set
		// created in this same batch.
		for _, ch := range rs.chains {
			for _, r := range ch.rules {
				for _, e := range r.exprs {
					if l, ok := e.(*expr.Lookup); ok && l.SetName == s.set.Name {
						l.SetID = s.set.ID
					}
				}
			}
		}
	}
	for _, ch := range rs.chains {
		ch.chain.Table = rs.table
		c.AddChain(ch.chain)
		for _, r := range ch.rules {
			var ud []byte
			if r.comment != "" {
				ud = userdata.AppendString(nil, userdata.TypeComment, r.comment)
			}
			c.AddRule(&nftables.Rule{Table: rs.table, Chain: ch.chain, Exprs: r.exprs, UserData: ud})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("writing table %s %s: %w", familyName(rs.table.Family), rs.table.Name, err)
	}
	return nil
}

// deleteTable deletes table t with everything in it; a missing table is not an error.
func deleteTable(c *nftables.Conn, t *nftables.Table) error {
	// Same trick as replace: add-then-delete in one batch never fails on ENOENT.
	c.AddTable(t)
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("deleting table %s %s: %w", familyName(t.Family), t.Name, err)
	}
	return nil
}

// errNoTable is returned by readRuleset when the table does not exist.
var errNoTable = errors.New("table not installed")

// readRuleset reads the table family/name back from the kernel.
func readRuleset(c *nftables.Conn, family nftables.TableFamily, name string) (*ruleset, error) {
	tables, err := c.ListTablesOfFamily(family)
	if err != nil {
		return nil, fmt.Errorf("listing tables: %w", err)
	}
	idx := slices.IndexFunc(tables, func(t *nftables.Table) bool { return t.Name == name })
	if idx < 0 {
		return nil, errNoTable
	}
	rs := &ruleset{table: tables[idx]}
	sets, err := c.GetSets(rs.table)
	if err != nil {
		return nil, fmt.Errorf("listing sets: %w", err)
	}
	for _, s := range sets {
		if s.Anonymous {
			continue
		}
		elems, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("listing elements of set %s: %w", s.Name, err)
		}
		rs.sets = append(rs.sets, setSpec{set: s, elems: elems})
	}
	chains, err := c.ListChainsOfTableFamily(family)
	if err != nil {
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name != name {
			continue
		}
		rules, err := c.GetRules(rs.table, ch)
		if err != nil {
			return nil, fmt.Errorf("listing rules of chain %s: %w", ch.Name, err)
		}
		cs := chainSpec{chain: ch}
		for _, r := range rules {
			comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			cs.rules = append(cs.rules, ruleSpec{exprs: fixCtStores(r.Exprs), comment: comment})
		}
		rs.chains = append(rs.chains, cs)
	}
	return rs, nil
}

// fixCtStores restores the ct statements (`ct mark set ...`) among exprs read
// from the kernel: google/nftables decodes a ct expression's destination
// register but not its source register (NFTA_CT_SREG), so a store reads back
// as a load into register 0. That is the verdict register, which no load can
// target, so such an expression is a store; every rule here works in reg.
func fixCtStores(exprs []expr.Any) []expr.Any {
	for _, e := range exprs {
		if ct, ok := e.(*expr.Ct); ok && !ct.SourceRegister && ct.Register == 0 {
			ct.SourceRegister, ct.Register = true, reg
		}
	}
	return exprs
}

// render returns rs in an nft-like notation, one statement per line. Every
// expression is shown, implicit dependencies (meta nfproto, meta l4proto)
// included, so the text says exactly what the kernel evaluates. Sets and chains
// are sorted by name so the output is stable.
func (rs *ruleset) render() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s {\n", familyName(rs.table.Family), rs.table.Name)
	sets := slices.Clone(rs.sets)
	slices.SortFunc(sets, func(x, y setSpec) int { return strings.Compare(x.set.Name, y.set.Name) })
	for _, s := range sets {
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n", s.set.Name, s.set.KeyType.Name)
		if len(s.elems) > 0 {
			var elems []string
			for _, e := range s.elems {
				elems = append(elems, formatValue(kindOfSetType(s.set.KeyType), e.Key))
			}
			slices.Sort(elems)
			fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
		}
		b.WriteString("\t}\n")
	}
	chains := slices.Clone(rs.chains)
	slices.SortFunc(chains, func(x, y chainSpec) int { return strings.Compare(x.chain.Name, y.chain.Name) })
	for _, ch := range chains {
		fmt.Fprintf(&b, "\tchain %s {\n", ch.chain.Name)
		if ch.chain.Hooknum != nil && ch.chain.Priority != nil {
			policy := "accept"
			if ch.chain.Policy != nil && *ch.chain.Policy == nftables.ChainPolicyDrop {
				policy = "drop"
			}
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %d; policy %s;\n",
				ch.chain.Type, hookName(*ch.chain.Hooknum), *ch.chain.Priority, policy)
		}
		for _, r := range ch.rules {
			fmt.Fprintf(&b, "\t\t%s\n", renderRule(r))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// lines is render split into lines, for JSON reports.
func (rs *ruleset) lines() []string {
	return strings.Split(strings.TrimSuffix(strings.ReplaceAll(rs.render(), "\t", "  "), "\n"), "\n")
}

// valueKind says how to print the bytes compared against a register.
type valueKind int

const (
	kindRaw valueKind = iota
	kindL4Proto
	kindNFProto
	kindIfname
	kindMark
	kindPort
	kindAddr
	kindFibType
)

// operand is what a register holds: the text that loaded it and how to print
// values compared against it.
type operand struct {
	text   string
	kind   valueKind
	mask   []byte // address prefix mask, printed by the comparison
	masked bool   // a bitwise operation was applied (nft then writes `==`)
	data   []byte // set for immediates
}

func renderRule(r ruleSpec) string {
	var (
		out  []string
		regs = map[uint32]operand{}
		l4   = "th" // protocol of the transport header, from the last `meta l4proto` match
	)
	for _, e := range r.exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if e.SourceRegister {
				out = append(out, fmt.Sprintf("%s set %s", metaName(e.Key), regs[e.Register].text))
				continue
			}
			regs[e.Register] = operand{text: metaName(e.Key), kind: metaKind(e.Key)}
		case *expr.Payload:
			regs[e.DestRegister] = payloadOperand(e, l4)
		case *expr.Ct:
			if e.SourceRegister {
				out = append(out, fmt.Sprintf("%s set %s", ctName(e.Key), regs[e.Register].text))
				continue
			}
			regs[e.Register] = operand{text: ctName(e.Key), kind: ctKind(e.Key)}
		case *expr.Fib:
			regs[e.Register] = fibOperand(e)
		case *expr.Bitwise:
			src := regs[e.SourceRegister]
			switch {
			case isZero(e.Xor):
				if src.kind == kindAddr {
					src.mask = e.Mask // printed as a prefix by the comparison
				} else {
					src.text = fmt.Sprintf("%s & %s", src.text, formatValue(src.kind, e.Mask))
					src.masked = true
				}
			case isComplement(e.Mask, e.Xor):
				src.text = fmt.Sprintf("%s | %s", src.text, formatValue(src.kind, e.Xor))
			case disjoint(e.Mask, e.Xor):
				// Clearing bits, then setting some of them: nft writes `x & m | v`.
				src.text = fmt.Sprintf("%s & %s | %s", src.text, formatValue(src.kind, e.Mask), formatValue(src.kind, e.Xor))
			default:
				src.text = fmt.Sprintf("(%s & %s) ^ %s", src.text, formatValue(src.kind, e.Mask), formatValue(src.kind, e.Xor))
			}
			regs[e.DestRegister] = src
		case *expr.Cmp:
			lhs := regs[e.Register]
			if lhs.text == "meta l4proto" && e.Op == expr.CmpOpEq {
				l4 = formatValue(kindL4Proto, e.Data)
			}
			val := formatValue(lhs.kind, e.Data)
			op := cmpOp(e.Op)
			if lhs.mask != nil {
				val = formatPrefix(e.Data, lhs.mask)
			}
			if lhs.masked && e.Op == expr.CmpOpEq {
				op = " == "
			}
			out = append(out, fmt.Sprintf("%s%s%s", lhs.text, op, val))
		case *expr.Lookup:
			op := " "
			if e.Invert {
				op = " != "
			}
			out = append(out, fmt.Sprintf("%s%s@%s", regs[e.SourceRegister].text, op, e.SetName))
		case *expr.Immediate:
			regs[e.Register] = operand{text: fmt.Sprintf("0x%x", e.Data), data: e.Data}
		case *expr.Counter:
			out = append(out, fmt.Sprintf("counter packets %d bytes %d", e.Packets, e.Bytes))
		case *expr.Redir:
			out = append(out, fmt.Sprintf("redirect to :%d", binary.BigEndian.Uint16(regs[e.RegisterProtoMin].data)))
		case *expr.NAT:
			kind := "snat"
			if e.Type == expr.NATTypeDestNAT {
				kind = "dnat"
			}
			out = append(out, fmt.Sprintf("%s %s to %s", kind, familyName(nftables.TableFamily(e.Family)), formatValue(kindAddr, regs[e.RegAddrMin].data)))
		case *expr.Verdict:
			out = append(out, verdictName(e))
		default:
			out = append(out, fmt.Sprintf("<%T>", e))
		}
	}
	s := strings.Join(out, " ")
	if r.comment != "" {
		s += fmt.Sprintf(" comment %q", r.comment)
	}
	return s
}

func metaName(k expr.MetaKey) string {
	switch k {
	case expr.MetaKeyL4PROTO:
		return "meta l4proto"
	case expr.MetaKeyNFPROTO:
		return "meta nfproto"
	case expr.MetaKeyIIFNAME:
		return "iifname"
	case expr.MetaKeyOIFNAME:
		return "oifname"
	case expr.MetaKeyMARK:
		return "meta mark"
	default:
		return fmt.Sprintf("meta key %d", k)
	}
}

func metaKind(k expr.MetaKey) valueKind {
	switch k {
	case expr.MetaKeyL4PROTO:
		return kindL4Proto
	case expr.MetaKeyNFPROTO:
		return kindNFProto
	case expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME:
		return kindIfname
	case expr.MetaKeyMARK:
		return kindMark
	default:
		return kindRaw
	}
}

func ctName(k expr.CtKey) string {
	if k == expr.CtKeyMARK {
		return "ct mark"
	}
	return fmt.Sprintf("ct key %d", k)
}

func ctKind(k expr.CtKey) valueKind {
	if k == expr.CtKeyMARK {
		return kindMark
	}
	return kindRaw
}

func payloadOperand(p *expr.Payload, l4 string) operand {
	switch {
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 4 && p.Offset == 12:
		return operand{text: "ip saddr", kind: kindAddr}
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 4 && p.Offset == 16:
		return operand{text: "ip daddr", kind: kindAddr}
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 16 && p.Offset == 8:
		return operand{text: "ip6 saddr", kind: kindAddr}
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 16 && p.Offset == 24:
		return operand{text: "ip6 daddr", kind: kindAddr}
	case p.Base == expr.PayloadBaseTransportHeader && p.Len == 2 && p.Offset == 0:
		return operand{text: l4 + " sport", kind: kindPort}
	case p.Base == expr.PayloadBaseTransportHeader && p.Len == 2 && p.Offset == 2:
		return operand{text: l4 + " dport", kind: kindPort}
	default:
		return operand{text: fmt.Sprintf("@payload(base %d, offset %d, len %d)", p.Base, p.Offset, p.Len)}
	}
}

func fibOperand(f *expr.Fib) operand {
	var key []string
	for _, k := range []struct {
		on   bool
		name string
	}{{f.FlagSADDR, "saddr"}, {f.FlagDADDR, "daddr"}, {f.FlagMARK, "mark"}, {f.FlagIIF, "iif"}, {f.FlagOIF, "oif"}} {
		if k.on {
			key = append(key, k.name)
		}
	}
	result, kind := "oif", kindRaw
	switch {
	case f.ResultADDRTYPE:
		result, kind = "type", kindFibType
	case f.ResultOIFNAME:
		result, kind = "oifname", kindIfname
	}
	return operand{text: fmt.Sprintf("fib %s %s", strings.Join(key, " . "), result), kind: kind}
}

func cmpOp(op expr.CmpOp) string {
	switch op {
	case expr.CmpOpEq:
		return " "
	case expr.CmpOpNeq:
		return " != "
	case expr.CmpOpLt:
		return " < "
	case expr.CmpOpLte:
		return " <= "
	case expr.CmpOpGt:
		return " > "
	case expr.CmpOpGte:
		return " >= "
	default:
		return fmt.Sprintf(" op%d ", op)
	}
}

func verdictName(v *expr.Verdict) string {
	switch v.Kind {
	case expr.VerdictReturn:
		return "return"
	case expr.VerdictAccept:
		return "accept"
	case expr.VerdictDrop:
		return "drop"
	case expr.VerdictContinue:
		return "continue"
	case expr.VerdictJump:
		return "jump " + v.Chain
	case expr.VerdictGoto:
		return "goto " + v.Chain
	default:
		return fmt.Sprintf("verdict %d", v.Kind)
	}
}

func formatValue(kind valueKind, b []byte) string {
	switch kind {
	case kindL4Proto:
		if len(b) == 1 {
			switch b[0] {
			case unix.IPPROTO_TCP:
				return "tcp"
			case unix.IPPROTO_UDP:
				return "udp"
			}
		}
	case kindNFProto:
		if len(b) == 1 {
			switch b[0] {
			case unix.NFPROTO_IPV4:
				return "ipv4"
			case unix.NFPROTO_IPV6:
				return "ipv6"
			}
		}
	case kindIfname:
		return fmt.Sprintf("%q", strings.TrimRight(string(b), "\x00"))
	case kindMark:
		if len(b) == 4 {
			return fmt.Sprintf("0x%08x", binaryutil.NativeEndian.Uint32(b))
		}
	case kindPort:
		if len(b) == 2 {
			return fmt.Sprint(binary.BigEndian.Uint16(b))
		}
	case kindAddr:
		if a, ok := netip.AddrFromSlice(b); ok {
			return a.String()
		}
	case kindFibType:
		if len(b) == 4 {
			switch binaryutil.NativeEndian.Uint32(b) {
			case unix.RTN_LOCAL:
				return "local"
			case unix.RTN_UNICAST:
				return "unicast"
			}
		}
	}
	return fmt.Sprintf("0x%x", b)
}

func formatPrefix(addr, mask []byte) string {
	a, ok := netip.AddrFromSlice(addr)
	if !ok {
		return fmt.Sprintf("0x%x & 0x%x", addr, mask)
	}
	ones := 0
	for _, m := range mask {
		for bit := 7; bit >= 0; bit-- {
			if m&(1<<bit) == 0 {
				goto done
			}
			ones++
		}
	}
done:
	if p, err := a.Prefix(ones); err == nil && p.Addr() == a {
		return p.String()
	}
	return fmt.Sprintf("%s & 0x%x", a, mask)
}

func kindOfSetType(t nftables.SetDatatype) valueKind {
	switch t.Name {
	case nftables.TypeIPAddr.Name, nftables.TypeIP6Addr.Name:
		return kindAddr
	case nftables.TypeInetService.Name:
		return kindPort
	case nftables.TypeMark.Name:
		return kindMark
	default:
		return kindRaw
	}
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	default:
		return fmt.Sprintf("family%d", f)
	}
}

func hookName(h nftables.ChainHook) string {
	switch h {
	case *nftables.ChainHookPrerouting:
		return "prerouting"
	case *nftables.ChainHookInput:
		return "input"
	case *nftables.ChainHookForward:
		return "forward"
	case *nftables.ChainHookOutput:
		return "output"
	case *nftables.ChainHookPostrouting:
		return "postrouting"
	default:
		return fmt.Sprintf("hook%d", h)
	}
}

func isZero(b []byte) bool { return !slices.ContainsFunc(b, func(x byte) bool { return x != 0 }) }

// disjoint reports whether x and y share no set bit.
func disjoint(x, y []byte) bool {
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if x[i]&y[i] != 0 {
			return false
		}
	}
	return true
}

func isComplement(x, y []byte) bool {
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if x[i] != ^y[i] {
			return false
		}
	}
	return true
}

// Expression builders, so rule definitions read like the nft text they render to.

const reg = 1 // NFT_REG_1; every rule here needs one register at a time

func loadMeta(k expr.MetaKey) *expr.Meta { return &expr.Meta{Key: k, Register: reg} }

func eq(data []byte) *expr.Cmp  { return &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: data} }
func neq(data []byte) *expr.Cmp { return &expr.Cmp{Op: expr.CmpOpNeq, Register: reg, Data: data} }

func l4proto(proto byte) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyL4PROTO), eq([]byte{proto})}
}

func nfproto(proto byte) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyNFPROTO), eq([]byte{proto})}
}

func dport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		eq(binaryutil.BigEndian.PutUint16(port)),
	}
}

// addrField loads the IPv4 or IPv6 source or destination address; the caller
// must have matched the family first (meta nfproto, or the table is ip/ip6).
func addrField(v6, src bool) *expr.Payload {
	p := &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader}
	switch {
	case !v6 && src:
		p.Offset, p.Len = 12, 4
	case !v6:
		p.Offset, p.Len = 16, 4
	case src:
		p.Offset, p.Len = 8, 16
	default:
		p.Offset, p.Len = 24, 16
	}
	return p
}

// inPrefix matches the address in the register against p.
func inPrefix(p netip.Prefix) []expr.Any {
	p = p.Masked()
	n := p.Addr().BitLen() / 8
	mask := make([]byte, n)
	for i := range p.Bits() {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return []expr.Any{
		&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: uint32(n), Mask: mask, Xor: make([]byte, n)},
		eq(p.Addr().AsSlice()),
	}
}

// metaMark loads the packet mark (meta mark); setMetaMark stores it.
func metaMark() expr.Any { return loadMeta(expr.MetaKeyMARK) }

func setMetaMark() expr.Any {
	return &expr.Meta{Key: expr.MetaKeyMARK, Register: reg, SourceRegister: true}
}

// connMark loads the connection's mark (ct mark); setConnMark stores it.
func connMark() expr.Any { return &expr.Ct{Key: expr.CtKeyMARK, Register: reg} }

func setConnMark() expr.Any {
	return &expr.Ct{Key: expr.CtKeyMARK, Register: reg, SourceRegister: true}
}

// maskedMark loads a mark and keeps its bits mask.
func maskedMark(load expr.Any, mask uint32) []expr.Any {
	return []expr.Any{load, &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4,
		Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: make([]byte, 4)}}
}

// markIs matches the bits mask of the mark load reads against mark.
func markIs(load expr.Any, mask, mark uint32) []expr.Any {
	return append(maskedMark(load, mask), eq(binaryutil.NativeEndian.PutUint32(mark)))
}

// markIsNot matches when the bits mask of the mark load reads are not mark.
func markIsNot(load expr.Any, mask, mark uint32) []expr.Any {
	return append(maskedMark(load, mask), neq(binaryutil.NativeEndian.PutUint32(mark)))
}

// setMarkBits sets the bits mask of a mark to mark and keeps the others:
// load it, clear mask, xor in mark, store.
func setMarkBits(load, store expr.Any, mask, mark uint32) []expr.Any {
	return []expr.Any{load,
		&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(^mask), Xor: binaryutil.NativeEndian.PutUint32(mark & mask)},
		store}
}

func redirectTo(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Counter{},
		&expr.Immediate{Register: reg, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.Redir{RegisterProtoMin: reg},
	}
}

func verdict(k expr.VerdictKind) *expr.Verdict { return &expr.Verdict{Kind: k} }

func rule(comment string, parts ...[]expr.Any) ruleSpec {
	return ruleSpec{exprs: slices.Concat(parts...), comment: comment}
}

func one(e ...expr.Any) []expr.Any { return e }
