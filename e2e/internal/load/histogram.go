package load

import (
	"math"
	"math/bits"
	"time"
)

// Histogram counts non-negative values in log-linear buckets, in the manner of
// HdrHistogram: values below subBucketCount are counted exactly, and larger
// values fall in buckets no wider than 1/subBucketHalf of their size, so every
// reported value is within 0.1% of a recorded one. Recording is O(1) and the
// memory is fixed. A Histogram is not safe for concurrent use.
type Histogram struct {
	counts   []uint64
	total    uint64
	min, max int64
	sum      float64
}

const (
	// subBucketBits sets the precision: 2^(subBucketBits-1) = 1024 steps per
	// power of two, a relative error below 0.1%.
	subBucketBits  = 11
	subBucketCount = 1 << subBucketBits
	subBucketHalf  = subBucketCount / 2
	// maxValueBits bounds the recordable value: 2^40 ns is about 18 minutes,
	// longer than any run may last. Larger values are counted as the maximum.
	maxValueBits = 40
	// HistogramMax is the largest value a Histogram records faithfully.
	HistogramMax = 1<<maxValueBits - 1
)

// NewHistogram returns an empty histogram.
func NewHistogram() *Histogram {
	buckets := maxValueBits - subBucketBits + 1
	return &Histogram{counts: make([]uint64, (buckets+1)*subBucketHalf)}
}

// index returns the counts slot for v, 0 <= v <= HistogramMax.
func index(v int64) int {
	// bucket is how many bits v has beyond the sub-bucket range; within a
	// bucket the top subBucketBits bits of v pick the slot.
	bucket := bits.Len64(uint64(v)|(subBucketCount-1)) - subBucketBits
	sub := int(v >> bucket)
	return bucket*subBucketHalf + sub
}

// highestEquivalent returns the largest value that shares slot i.
func highestEquivalent(i int) int64 {
	bucket, sub := i/subBucketHalf-1, i%subBucketHalf+subBucketHalf
	if bucket < 0 {
		bucket, sub = 0, i
	}
	return int64(sub)<<bucket + (1 << bucket) - 1
}

// Record counts one value, clamped to [0, HistogramMax].
func (h *Histogram) Record(v int64) {
	v = min(max(v, 0), HistogramMax)
	h.counts[index(v)]++
	if h.total == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.total++
	h.sum += float64(v)
}

// RecordDuration counts d in nanoseconds.
func (h *Histogram) RecordDuration(d time.Duration) { h.Record(int64(d)) }

// Merge adds every value counted in o.
func (h *Histogram) Merge(o *Histogram) {
	if o.total == 0 {
		return
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.total == 0 || o.min < h.min {
		h.min = o.min
	}
	h.max = max(h.max, o.max)
	h.total += o.total
	h.sum += o.sum
}

// Count returns how many values were recorded.
func (h *Histogram) Count() uint64 { return h.total }

// Min returns the smallest value recorded, or 0.
func (h *Histogram) Min() int64 { return h.min }

// Max returns the largest value recorded, or 0.
func (h *Histogram) Max() int64 { return h.max }

// Mean returns the mean of the values recorded, or 0.
func (h *Histogram) Mean() float64 {
	if h.total == 0 {
		return 0
	}
	return h.sum / float64(h.total)
}

// Quantile returns the value below or at which a fraction q (0 to 1) of the
// recorded values fall, as the highest value of its bucket, never above Max.
// It returns 0 for an empty histogram.
func (h *Histogram) Quantile(q float64) int64 {
	if h.total == 0 {
		return 0
	}
	q = min(max(q, 0), 1)
	// rank is the 1-based position of the value sought.
	rank := max(uint64(math.Ceil(q*float64(h.total))), 1)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(highestEquivalent(i), h.max)
		}
	}
	return h.max
}
