package load

import (
	"math"
	"testing"
)

func TestHistogramQuantiles(t *testing.T) {
	tests := []struct {
		name   string
		values []int64
		q      float64
		want   int64
		// tolerance is the relative error allowed; 0 means exact.
		tolerance float64
	}{
		{name: "an empty histogram reports zero", values: nil, q: 0.5, want: 0},
		{name: "small values are counted exactly: p50 of 1..1000", values: seq(1, 1000), q: 0.5, want: 500},
		{name: "small values are counted exactly: p90 of 1..1000", values: seq(1, 1000), q: 0.9, want: 900},
		{name: "small values are counted exactly: p99 of 1..1000", values: seq(1, 1000), q: 0.99, want: 990},
		{name: "small values are counted exactly: p99.9 of 1..1000", values: seq(1, 1000), q: 0.999, want: 999},
		{name: "the 100th percentile is the maximum", values: seq(1, 1000), q: 1, want: 1000},
		{name: "the 0th percentile is the smallest value's bucket", values: seq(5, 10), q: 0, want: 5},
		{name: "a single value is every percentile", values: []int64{42}, q: 0.99, want: 42},
		{
			name:      "large values are within 0.1%: p50 of milliseconds 1..1000",
			values:    scale(seq(1, 1000), 1_000_000),
			q:         0.5,
			want:      500_000_000,
			tolerance: 1.0 / 1024,
		},
		{
			name:      "large values are within 0.1%: p99 of milliseconds 1..1000",
			values:    scale(seq(1, 1000), 1_000_000),
			q:         0.99,
			want:      990_000_000,
			tolerance: 1.0 / 1024,
		},
		{
			name:   "a percentile never exceeds the maximum recorded",
			values: []int64{1_000_001},
			q:      0.5,
			want:   1_000_001,
		},
		{
			name:   "a tail of slow values shows at p99 but not p90",
			values: append(repeat(1000, 98), 5_000_000_000, 5_000_000_000),
			q:      0.9,
			want:   1000,
		},
		{
			name:      "a tail of slow values shows at p99",
			values:    append(repeat(1000, 98), 5_000_000_000, 5_000_000_000),
			q:         0.99,
			want:      5_000_000_000,
			tolerance: 1.0 / 1024,
		},
		{name: "negative values count as zero", values: []int64{-5, -1}, q: 1, want: 0},
		{name: "values beyond the range count as its top", values: []int64{math.MaxInt64}, q: 1, want: HistogramMax},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := NewHistogram()
			for _, v := range tt.values {
				h.Record(v)
			}
			got := h.Quantile(tt.q)
			if tt.tolerance == 0 {
				if got != tt.want {
					t.Errorf("Quantile(%v) = %d, want %d", tt.q, got, tt.want)
				}
				return
			}
			if rel := math.Abs(float64(got-tt.want)) / float64(tt.want); rel > tt.tolerance {
				t.Errorf("Quantile(%v) = %d, want %d within %.4f%% (off by %.4f%%)",
					tt.q, got, tt.want, tt.tolerance*100, rel*100)
			}
		})
	}
}

func TestHistogramBucketsCoverEveryValueOnce(t *testing.T) {
	// Every value maps to a slot whose highest value is at least it, and
	// within the precision promised.
	for _, v := range []int64{0, 1, 2047, 2048, 2049, 4095, 4096, 1 << 20, 1<<20 + 12345, 1<<39 + 7, HistogramMax} {
		i := index(v)
		hi := highestEquivalent(i)
		if hi < v || float64(hi-v) > float64(v)/1024+1 {
			t.Errorf("value %d: slot %d tops out at %d", v, i, hi)
		}
		if i > 0 && highestEquivalent(i-1) >= v {
			t.Errorf("value %d: the slot before, %d, already reaches %d", v, i-1, highestEquivalent(i-1))
		}
	}
}

func TestHistogramMergeAddsCountsMinMaxAndMean(t *testing.T) {
	a, b := NewHistogram(), NewHistogram()
	for _, v := range seq(1, 50) {
		a.Record(v)
	}
	for _, v := range seq(51, 100) {
		b.Record(v)
	}
	a.Merge(b)
	a.Merge(NewHistogram())
	if a.Count() != 100 || a.Min() != 1 || a.Max() != 100 || a.Mean() != 50.5 {
		t.Errorf("merged count %d min %d max %d mean %v, want 100 1 100 50.5", a.Count(), a.Min(), a.Max(), a.Mean())
	}
	if got := a.Quantile(0.9); got != 90 {
		t.Errorf("merged p90 = %d, want 90", got)
	}
}

func seq(from, to int64) []int64 {
	var v []int64
	for i := from; i <= to; i++ {
		v = append(v, i)
	}
	return v
}

func scale(v []int64, by int64) []int64 {
	out := make([]int64, len(v))
	for i, x := range v {
		out[i] = x * by
	}
	return out
}

func repeat(v int64, n int) []int64 {
	out := make([]int64, n)
	for i := range out {
		out[i] = v
	}
	return out
}
