//! The per-packet inputs of the path agent, and its steady-state timer/probe cycle, never
//! allocate (counting global allocator, counting only on the test's own thread).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skymesh_agent_core::path::{
    PathAgent, PathConfig, PathId, ProbeSettings, RemoteEndpoint, UplinkConfig, UplinkId,
    UplinkKind,
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

#[test]
fn per_packet_inputs_and_steady_state_probing_do_not_allocate() {
    let config = PathConfig {
        uplinks: (0..2)
            .map(|i| UplinkConfig {
                name: format!("up{i}"),
                interface: None,
                source_address: None,
                kind: UplinkKind::Terrestrial,
                priority: i,
                probe: ProbeSettings::default(),
                metered: false,
                probe_budget_bytes_per_hour: None,
            })
            .collect(),
        failover: Default::default(),
    }
    .validate()
    .expect("valid");
    let remote: SocketAddr = "198.18.0.1:51820".parse().expect("addr");
    let t0 = Instant::now();
    let mut agent = PathAgent::new(
        &config,
        &[RemoteEndpoint {
            addr: remote,
            priority: 0,
        }],
        1,
        t0,
    );
    let active = PathId {
        uplink: UplinkId(0),
        remote,
    };
    let rtt = Duration::from_millis(30);
    let mut now = t0;
    // Warm up: queues reach their steady capacity.
    let run = |agent: &mut PathAgent, now: &mut Instant, packets: u32| {
        for k in 0..packets {
            *now += Duration::from_millis(10);
            agent.handle_data_sent(*now);
            agent.handle_authenticated_rx(active, *now + rtt);
            if agent.poll_timeout().is_some_and(|t| t <= *now) {
                agent.handle_timeout(*now);
            }
            while let Some(tx) = agent.poll_transmit() {
                if k % 7 != 0 {
                    let _ = agent.handle_probe_reply(tx.path, tx.nonce, *now + rtt);
                }
            }
            while agent.poll_event().is_some() {}
        }
    };
    run(&mut agent, &mut now, 2_000);
    let n = allocations_during(|| run(&mut agent, &mut now, 100_000));
    assert_eq!(n, 0, "allocations in 100k packets of steady state");
    assert_eq!(agent.active_path(), Some(active));
    // The counter works: allocating is seen.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 16]))) >= 1);
}
