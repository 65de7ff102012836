//! The decode step's dense products on their own (bench/serving/products.sh runs it): one
//! layer of the ~100M-parameter model bench/serving generates (hidden 768, 4 of 12 heads
//! for keys and values, MLP 2048), f32, at 1 to 32 rows, as `Weight::forward` serves them.
//! Prints a table: time per layer and the multiply-adds per second reached.
//!
//!     cargo run --example bench_products

use std::time::Instant;

use loraops_engine::base::Weight;

/// (name, out, in) of one layer's products.
const SHAPES: [(&str, usize, usize); 4] = [
    ("q_proj, o_proj", 768, 768),
    ("k_proj, v_proj", 256, 768),
    ("gate_proj, up_proj", 2048, 768),
    ("down_proj", 768, 2048),
];

/// Weights of one product, distinct per copy so that they come from memory as a model's do.
fn weights(out_f: usize, in_f: usize, copies: usize) -> Vec<Weight> {
    (0..copies)
        .map(|c| Weight::F32 {
            w: (0..out_f * in_f)
                .map(|i| ((i * 31 + c * 7) % 97) as f32 / 97.0 - 0.5)
                .collect(),
            out_f,
            in_f,
        })
        .collect()
}

fn main() {
    // Sixteen layers' worth of each weight: a step reads them from memory, not from cache.
    const LAYERS: usize = 16;
    let sets: Vec<_> = SHAPES
        .iter()
        .map(|&(name, o, i)| {
            let copies = if name.contains(',') {
                2 * LAYERS
            } else {
                LAYERS
            };
            (name, o, i, weights(o, i, copies))
        })
        .collect();
    println!("| rows | ms per 16 layers | GMAC/s | per product: ms (GMAC/s) |");
    println!("|---|---|---|---|");
    for rows in [1, 4, 8, 16, 32] {
        let mut total = 0.0;
        let mut macs = 0.0;
        let mut parts = Vec::new();
        for (name, o, i, ws) in &sets {
            let x: Vec<f32> = (0..rows * i).map(|k| (k % 13) as f32 / 13.0).collect();
            let run = || {
                for w in ws {
                    std::hint::black_box(w.forward(&x, rows));
                }
            };
            run();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                run();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let m = (rows * o * i * ws.len()) as f64;
            total += best;
            macs += m;
            parts.push(format!("{name} {:.2} ({:.1})", best * 1e3, m / best / 1e9));
        }
        println!(
            "| {rows} | {:.2} | {:.1} | {} |",
            total * 1e3,
            macs / total / 1e9,
            parts.join(", ")
        );
    }
}
