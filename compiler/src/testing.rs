//! Specs the tests share: the shipped DeepSeek-V3 spec (so the tests check what users run), and
//! tiny variants small enough to check estimates with pencil and paper.

use dsc_lang::*;
use std::path::Path;

/// DeepSeek-V3 pre-training on 2048 H800s: `models/deepseek-v3.dsc`.
pub fn deepseek_v3() -> Spec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3.dsc");
    let loaded = dsc_lang::load(&path, &[]);
    loaded.checked_spec().cloned().expect("models/deepseek-v3.dsc checks cleanly")
}

/// One layer with a dense FFN, no MTP, on one GPU: vocab 10, hidden 4, 2 heads, q rank 3,
/// kv rank 2, nope 2 + rope 1 = qk 3, v 2, intermediate 5, sequence 3, batch 2 of 1.
pub fn tiny_dense() -> Spec {
    let mut spec = deepseek_v3();
    let model = &mut spec.model;
    model.name = "tiny".into();
    model.vocab = 10;
    model.hidden = 4;
    model.layers = 1;
    model.attention = Mla {
        heads: 2,
        q_rank: 3,
        kv_rank: 2,
        qk_nope_dim: 2,
        qk_rope_dim: 1,
        v_dim: 2,
        rope_theta: 10_000.0,
        yarn: None,
    };
    model.ffn = vec![FfnRange { layers: LayerRange { start: 0, end: 1 }, ffn: Ffn::Dense { intermediate: 5 } }];
    model.mtp = None;
    spec.train.seq_len = 3;
    spec.train.batch = Batch::Constant { sequences: 2 };
    spec.parallel = Parallel {
        nodes: 1,
        gpus_per_node: 1,
        gpu: Gpu { name: "cpu".into(), memory_bytes: 1 << 20, sms: 1 },
        pipeline: Pipeline { schedule: PipelineSchedule::OneFOneB, stages: 1, layout: Vec::new() },
        expert: ExpertParallel { size: 1, max_nodes: 1 },
        data: DataParallel { size: 1, zero: 0 },
        comm_sms: 0,
    };
    spec
}

/// [`tiny_dense`] with an MoE FFN: 1 shared + 4 routed experts of intermediate 2, top 2.
pub fn tiny_moe() -> Spec {
    let mut spec = tiny_dense();
    let Ffn::Moe(moe) = deepseek_v3().model.ffn[1].ffn.clone() else { unreachable!() };
    spec.model.ffn[0].ffn =
        Ffn::Moe(Moe { routed_experts: 4, top_k: 2, intermediate: 2, groups: 2, keep_groups: 1, ..moe });
    spec
}
