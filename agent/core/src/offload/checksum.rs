//! The Internet checksum (RFC 1071), its incremental update (RFC 1624) and the TCP/UDP
//! pseudo-headers.
//!
//! Vocabulary: a *sum* is the folded 16-bit ones'-complement sum of big-endian words (not yet
//! complemented); a *checksum* is its complement, the value written into a header.
//!
//! [`sum`] is the fast path. Because the ones'-complement sum does not depend on byte order
//! (RFC 1071 §2(B)), it adds native-endian 64-bit words with end-around carry, or 32-bit halves
//! into 64-bit SIMD lanes (SSE2 is part of x86_64; AVX2 is detected once at run time and the
//! choice cached), and swaps the folded result into network order at the end.
//! [`sum_reference`] is the plain word-by-word RFC 1071 loop the property tests compare against.

#[cfg(target_arch = "x86_64")]
use std::sync::atomic::{AtomicU8, Ordering};

/// Below this length the SIMD set-up costs more than it saves; measured with `benches/checksum.rs`.
const SIMD_MIN_LEN: usize = 128;

/// Plain RFC 1071: big-endian 16-bit words, an odd trailing byte padded with zero.
pub fn sum_reference(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    fold64(acc)
}

/// The fastest implementation this CPU offers (AVX2, SSE2, or 64-bit scalar).
#[inline]
pub fn sum(data: &[u8]) -> u16 {
    #[cfg(target_arch = "x86_64")]
    {
        if data.len() >= SIMD_MIN_LEN {
            return if has_avx2() {
                x86::sum_avx2_checked(data)
            } else {
                x86::sum_sse2_checked(data)
            };
        }
    }
    sum_wide(data)
}

/// Portable fast path: native-endian 64-bit words with end-around carry, four accumulators.
pub fn sum_wide(data: &[u8]) -> u16 {
    u16::from_be(fold64(sum_ne_wide(data)))
}

/// SSE2 path (always present on x86_64). `None` on other architectures.
pub fn sum_sse2(data: &[u8]) -> Option<u16> {
    #[cfg(target_arch = "x86_64")]
    {
        Some(x86::sum_sse2_checked(data))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = data;
        None
    }
}

/// AVX2 path, or `None` when this CPU (or architecture) lacks AVX2.
pub fn sum_avx2(data: &[u8]) -> Option<u16> {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            return Some(x86::sum_avx2_checked(data));
        }
        None
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = data;
        None
    }
}

/// Name of the implementation [`sum`] uses for long buffers, for logs and bench labels.
pub fn implementation() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            return "avx2";
        }
        "sse2"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "scalar-wide"
    }
}

/// The checksum (complemented sum) of `data`.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !sum(data)
}

/// Ones'-complement addition of two folded sums.
#[inline]
pub fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    (s as u16).wrapping_add((s >> 16) as u16)
}

/// Folds a wide accumulator of 16-bit words into a 16-bit ones'-complement sum.
#[inline]
pub fn fold64(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changes from
/// `old` to `new`. `check` is the checksum as stored in the header.
#[inline]
pub fn update_u16(check: u16, old: u16, new: u16) -> u16 {
    !add(add(!check, !old), new)
}

/// [`update_u16`] for a 32-bit field aligned on a 16-bit boundary (TCP seq/ack, IPv4 address).
#[inline]
pub fn update_u32(check: u16, old: u32, new: u32) -> u16 {
    let c = update_u16(check, (old >> 16) as u16, (new >> 16) as u16);
    update_u16(c, old as u16, new as u16)
}

/// Folded sum of the IPv4 TCP/UDP pseudo-header (RFC 793 §3.1, RFC 768).
#[inline]
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u16 {
    let acc = u64::from(u16::from_be_bytes([src[0], src[1]]))
        + u64::from(u16::from_be_bytes([src[2], src[3]]))
        + u64::from(u16::from_be_bytes([dst[0], dst[1]]))
        + u64::from(u16::from_be_bytes([dst[2], dst[3]]))
        + u64::from(proto)
        + u64::from(l4_len);
    fold64(acc)
}

/// Folded sum of the IPv6 pseudo-header (RFC 8200 §8.1); `l4_len` is the upper-layer length.
#[inline]
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], proto: u8, l4_len: u32) -> u16 {
    let mut acc: u64 = u64::from(proto) + u64::from(l4_len >> 16) + u64::from(l4_len & 0xffff);
    for w in src.chunks_exact(2).chain(dst.chunks_exact(2)) {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    fold64(acc)
}

/// Pseudo-header sum for an IP packet whose source/destination addresses are read from `ip`
/// (IPv4 when `v6` is false). Lengths are the caller's responsibility.
pub(crate) fn pseudo_header(ip: &[u8], v6: bool, proto: u8, l4_len: u32) -> u16 {
    if v6 {
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        dst.copy_from_slice(&ip[24..40]);
        pseudo_header_v6(&src, &dst, proto, l4_len)
    } else {
        pseudo_header_v4(
            [ip[12], ip[13], ip[14], ip[15]],
            [ip[16], ip[17], ip[18], ip[19]],
            proto,
            l4_len as u16,
        )
    }
}

/// Checksum of an L4 segment (header + payload, checksum field included as it stands) given the
/// pseudo-header sum. Verification: the result is 0 when the stored checksum is right.
#[inline]
pub fn l4_checksum(pseudo: u16, l4: &[u8]) -> u16 {
    !add(pseudo, sum(l4))
}

/// Recomputes the IPv4 header checksum of `hdr` (exactly IHL×4 bytes) in place.
pub fn ipv4_header_fix(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = !sum_wide(hdr);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn patch16(b: &mut [u8], field: usize, check_at: usize, new: u16) {
    let old = rd16(b, field);
    let c = update_u16(rd16(b, check_at), old, new);
    b[field..field + 2].copy_from_slice(&new.to_be_bytes());
    b[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Sets the IPv4 total length of header `hdr`, updating its header checksum incrementally.
pub fn ipv4_set_total_len(hdr: &mut [u8], total_len: u16) {
    patch16(hdr, 2, 10, total_len);
}

/// Sets the IPv4 identification of header `hdr`, updating its header checksum incrementally.
pub fn ipv4_set_id(hdr: &mut [u8], id: u16) {
    patch16(hdr, 4, 10, id);
}

/// Sets the sequence number of TCP header `tcp`, updating its checksum incrementally.
pub fn tcp_set_seq(tcp: &mut [u8], seq: u32) {
    let c = update_u32(rd16(tcp, 16), rd32(tcp, 4), seq);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Sets the flags byte (offset 13) of TCP header `tcp`, updating its checksum incrementally.
pub fn tcp_set_flags(tcp: &mut [u8], flags: u8) {
    let old = rd16(tcp, 12);
    let new = (old & 0xff00) | u16::from(flags);
    let c = update_u16(rd16(tcp, 16), old, new);
    tcp[13] = flags;
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Adjusts the TCP/UDP checksum stored at `tcp[check_at..]` for a change of the L4 length
/// carried in the pseudo-header (e.g. after an IPv4 total-length rewrite).
pub fn l4_set_pseudo_len(l4: &mut [u8], check_at: usize, old_len: u16, new_len: u16) {
    let c = update_u16(rd16(l4, check_at), old_len, new_len);
    l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Unfolded native-endian sum: the caller folds and converts with `u16::from_be`.
fn sum_ne_wide(data: &[u8]) -> u64 {
    #[inline(always)]
    fn adc(acc: u64, w: u64) -> u64 {
        let (s, carry) = acc.overflowing_add(w);
        // Cannot overflow: if the add wrapped, `s` is at most 2^64 - 2.
        s + u64::from(carry)
    }
    #[inline(always)]
    fn word(b: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_ne_bytes(w)
    }
    let (mut a, mut b, mut c, mut d) = (0u64, 0u64, 0u64, 0u64);
    let mut blocks = data.chunks_exact(32);
    for blk in &mut blocks {
        a = adc(a, word(&blk[0..8]));
        b = adc(b, word(&blk[8..16]));
        c = adc(c, word(&blk[16..24]));
        d = adc(d, word(&blk[24..32]));
    }
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        a = adc(a, word(w));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 8];
        tail[..rest.len()].copy_from_slice(rest);
        b = adc(b, u64::from_ne_bytes(tail));
    }
    adc(adc(a, b), adc(c, d))
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    // 0 = not probed yet, 1 = absent, 2 = present.
    static AVX2: AtomicU8 = AtomicU8::new(0);
    match AVX2.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let found = std::arch::is_x86_feature_detected!("avx2");
            AVX2.store(if found { 2 } else { 1 }, Ordering::Relaxed);
            found
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{fold64, sum_ne_wide};
    use std::arch::x86_64::*;

    /// The per-lane sums are exact below 2^32 additions per lane; feeding at most this many
    /// bytes per call keeps far below that.
    const MAX_CHUNK: usize = 1 << 30;

    #[inline]
    fn end_around(a: u64, b: u64) -> u64 {
        let (s, c) = a.overflowing_add(b);
        s + u64::from(c)
    }

    pub(super) fn sum_avx2_checked(data: &[u8]) -> u16 {
        let mut acc = 0u64;
        for chunk in data.chunks(MAX_CHUNK) {
            // SAFETY: only reached after `has_avx2()` confirmed the CPU supports AVX2.
            acc = end_around(acc, unsafe { sum_ne_avx2(chunk) });
        }
        u16::from_be(fold64(acc))
    }

    pub(super) fn sum_sse2_checked(data: &[u8]) -> u16 {
        let mut acc = 0u64;
        for chunk in data.chunks(MAX_CHUNK) {
            // SAFETY: SSE2 is part of the x86_64 baseline.
            acc = end_around(acc, unsafe { sum_ne_sse2(chunk) });
        }
        u16::from_be(fold64(acc))
    }

    /// Per 64-bit lane, `all` adds whole lanes (wrapping) and `hi` adds their upper halves;
    /// both are exact below 2^32 additions, so the lower halves' sum is `all - (hi << 32)`.
    /// Three ALU ops per vector instead of four for mask + shift + two adds.
    #[inline]
    fn combine_lanes(all: &[u64], hi: &[u64]) -> u64 {
        let mut acc = 0u64;
        for (&a, &h) in all.iter().zip(hi) {
            let lo = a.wrapping_sub(h << 32);
            acc = end_around(end_around(acc, lo), h);
        }
        acc
    }

    #[target_feature(enable = "avx2")]
    unsafe fn sum_ne_avx2(data: &[u8]) -> u64 {
        let mut blocks = data.chunks_exact(128);
        // SAFETY: every load reads 32 bytes inside a 128-byte block from `chunks_exact`;
        // unaligned loads are used, and AVX2 is enabled by the caller's check.
        let (all, hi) = unsafe {
            let z = _mm256_setzero_si256();
            let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
            let (mut h0, mut h1, mut h2, mut h3) = (z, z, z, z);
            for blk in &mut blocks {
                let p = blk.as_ptr();
                let v0 = _mm256_loadu_si256(p.cast::<__m256i>());
                let v1 = _mm256_loadu_si256(p.add(32).cast::<__m256i>());
                let v2 = _mm256_loadu_si256(p.add(64).cast::<__m256i>());
                let v3 = _mm256_loadu_si256(p.add(96).cast::<__m256i>());
                a0 = _mm256_add_epi64(a0, v0);
                h0 = _mm256_add_epi64(h0, _mm256_srli_epi64::<32>(v0));
                a1 = _mm256_add_epi64(a1, v1);
                h1 = _mm256_add_epi64(h1, _mm256_srli_epi64::<32>(v1));
                a2 = _mm256_add_epi64(a2, v2);
                h2 = _mm256_add_epi64(h2, _mm256_srli_epi64::<32>(v2));
                a3 = _mm256_add_epi64(a3, v3);
                h3 = _mm256_add_epi64(h3, _mm256_srli_epi64::<32>(v3));
            }
            // Lane sums stay exact when added together (each is far below 2^62).
            a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
            h0 = _mm256_add_epi64(_mm256_add_epi64(h0, h1), _mm256_add_epi64(h2, h3));
            let mut all = [0u64; 4];
            let mut hi = [0u64; 4];
            _mm256_storeu_si256(all.as_mut_ptr().cast::<__m256i>(), a0);
            _mm256_storeu_si256(hi.as_mut_ptr().cast::<__m256i>(), h0);
            (all, hi)
        };
        let rest = blocks.remainder();
        let tail = if rest.len() >= 32 {
            // SAFETY: SSE2 is baseline on x86_64.
            unsafe { sum_ne_sse2(rest) }
        } else {
            sum_ne_wide(rest)
        };
        end_around(tail, combine_lanes(&all, &hi))
    }

    #[target_feature(enable = "sse2")]
    unsafe fn sum_ne_sse2(data: &[u8]) -> u64 {
        let mut blocks = data.chunks_exact(32);
        // SAFETY: every load reads 16 bytes inside a 32-byte block from `chunks_exact`;
        // unaligned loads are used, and SSE2 is baseline on x86_64.
        let (all, hi) = unsafe {
            let mut a0 = _mm_setzero_si128();
            let mut a1 = _mm_setzero_si128();
            let mut h0 = _mm_setzero_si128();
            let mut h1 = _mm_setzero_si128();
            for blk in &mut blocks {
                let p = blk.as_ptr();
                let v0 = _mm_loadu_si128(p.cast::<__m128i>());
                let v1 = _mm_loadu_si128(p.add(16).cast::<__m128i>());
                a0 = _mm_add_epi64(a0, v0);
                h0 = _mm_add_epi64(h0, _mm_srli_epi64::<32>(v0));
                a1 = _mm_add_epi64(a1, v1);
                h1 = _mm_add_epi64(h1, _mm_srli_epi64::<32>(v1));
            }
            let mut all = [0u64; 4];
            let mut hi = [0u64; 4];
            _mm_storeu_si128(all.as_mut_ptr().cast::<__m128i>(), a0);
            _mm_storeu_si128(all.as_mut_ptr().add(2).cast::<__m128i>(), a1);
            _mm_storeu_si128(hi.as_mut_ptr().cast::<__m128i>(), h0);
            _mm_storeu_si128(hi.as_mut_ptr().add(2).cast::<__m128i>(), h1);
            (all, hi)
        };
        end_around(sum_ne_wide(blocks.remainder()), combine_lanes(&all, &hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_worked_example_sums_to_ddf2() {
        // RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum_reference(&data), 0xddf2);
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(sum_wide(&data), 0xddf2);
    }

    #[test]
    fn known_ipv4_header_checksum_is_b861() {
        // Classic example header 4500 0073 0000 4000 4011 [b861] c0a8 0001 c0a8 00c7.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        ipv4_header_fix(&mut hdr);
        assert_eq!(&hdr[10..12], &[0xb8, 0x61]);
        assert_eq!(checksum(&hdr), 0);
    }

    #[test]
    fn odd_trailing_byte_is_the_high_half_of_a_word() {
        assert_eq!(sum_reference(&[0xab]), 0xab00);
        assert_eq!(sum_wide(&[0xab]), 0xab00);
        assert_eq!(sum(&[0x01, 0x02, 0x03]), 0x0402);
    }

    #[test]
    fn all_ones_buffer_folds_to_ffff_on_every_path() {
        let data = vec![0xffu8; 70_001];
        let r = sum_reference(&data);
        assert_eq!(sum_wide(&data), r);
        assert_eq!(sum_sse2(&data).unwrap_or(r), r);
        assert_eq!(sum_avx2(&data).unwrap_or(r), r);
    }

    #[test]
    fn rfc1624_example_update_matches_recompute() {
        // RFC 1624 §4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
        assert_eq!(update_u16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }
}
