//! GSO split, GRO coalescing and checksumming never allocate once their reusable state exists
//! (counting global allocator, counting only on the test's own thread).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use skymesh_agent_core::offload::checksum::{self, ipv4_header_fix, l4_checksum, pseudo_header_v4};
use skymesh_agent_core::offload::{
    split, BatchSink, Gro, L4Csum, Offload, VnetHdr, L4, VNET_HDR_LEN,
};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.with(Cell::get)
}

/// An IPv4/TCP segment (20 + 20 bytes of headers) with valid checksums, written into `buf`.
fn tcp4(buf: &mut [u8], seq: u32, payload_len: usize) -> usize {
    let len = 40 + payload_len;
    let p = &mut buf[..len];
    p.fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    ipv4_header_fix(&mut p[..20]);
    p[20..22].copy_from_slice(&1234u16.to_be_bytes());
    p[22..24].copy_from_slice(&80u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    for (i, b) in p[40..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = l4_checksum(
        pseudo_header_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, (len - 20) as u16),
        &p[20..],
    );
    p[36..38].copy_from_slice(&c.to_be_bytes());
    len
}

#[test]
fn split_coalesce_and_checksum_do_not_allocate_per_packet() {
    const OFF: usize = 16;
    const N: usize = 44;
    let mut bufs = vec![vec![0u8; OFF + 65_535]; N];
    let mut lens = vec![0usize; N];
    let mut out = vec![0usize; N];
    let mut gro = Gro::new(N);
    let mut segs = vec![[0u8; 2048]; 64];
    let mut seg_lens = [0usize; 64];

    let allocs = allocations_during(|| {
        for round in 0..3u32 {
            for (i, (b, l)) in bufs.iter_mut().zip(lens.iter_mut()).enumerate() {
                *l = tcp4(&mut b[OFF..], round * 100_000 + i as u32 * 1448, 1448);
            }
            let (n, stats) = gro
                .coalesce(&mut bufs, &mut lens, OFF, &mut out)
                .expect("coalesce");
            assert_eq!((n, stats.merged), (1, N - 1));
            let head = out[0];
            let hdr = VnetHdr::decode(&bufs[head][OFF - VNET_HDR_LEN..]).expect("hdr");
            let pkt = &bufs[head][OFF..OFF + lens[head]];
            let Ok(Offload::Segment(plan)) = hdr.classify(pkt) else {
                panic!("GRO output must be a segmentation job");
            };
            assert_eq!(plan.l4, L4::Tcp);
            let mut sink = BatchSink::new(&mut segs, &mut seg_lens, 0);
            assert_eq!(split(pkt, &plan, L4Csum::Full, &mut sink), Ok(N));
            assert_eq!(checksum::checksum(&segs[0][..20]), 0);
        }
    });
    assert_eq!(allocs, 0);
}
