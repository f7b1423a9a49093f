//! Specs the tests share: DeepSeek-V3 as SPEC.md describes it, built by hand, and tiny variants
//! small enough to check estimates with pencil and paper.

use dsc_lang::*;

/// DeepSeek-V3 pre-training on 2048 H800s (SPEC.md).
pub fn deepseek_v3() -> Spec {
    let moe = Moe {
        shared_experts: 1,
        routed_experts: 256,
        top_k: 8,
        intermediate: 2048,
        gating: Gating::Sigmoid,
        groups: 8,
        keep_groups: 4,
        routed_scale: 2.5,
        bias_speed: Schedule {
            first: 0.001,
            changes: vec![Change {
                at: Position::Tokens(14_300_000_000_000),
                value: 0.0,
            }],
        },
        balance_alpha: 0.0001,
    };
    Spec {
        model: Model {
            name: "deepseek-v3".into(),
            vocab: 129_280,
            hidden: 7168,
            layers: 61,
            norm_eps: 1e-6,
            init_std: 0.006,
            attention: Mla {
                heads: 128,
                q_rank: 1536,
                kv_rank: 512,
                qk_nope_dim: 128,
                qk_rope_dim: 64,
                v_dim: 128,
                rope_theta: 10_000.0,
                yarn: Some(Yarn {
                    factor: 40.0,
                    original_seq: 4096,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale: 1.0,
                    mscale_all_dim: 1.0,
                }),
            },
            ffn: vec![
                FfnRange {
                    layers: LayerRange { start: 0, end: 3 },
                    ffn: Ffn::Dense {
                        intermediate: 18_432,
                    },
                },
                FfnRange {
                    layers: LayerRange { start: 3, end: 61 },
                    ffn: Ffn::Moe(moe),
                },
            ],
            mtp: Some(Mtp {
                depth: 1,
                share_embedding: true,
                share_head: true,
                loss_weight: Schedule {
                    first: 0.3,
                    changes: vec![Change {
                        at: Position::Tokens(10_000_000_000_000),
                        value: 0.1,
                    }],
                },
            }),
        },
        train: Train {
            tokens: 14_800_000_000_000,
            seq_len: 4096,
            batch: Batch::Ramp {
                from: 3072,
                to: 15_360,
                over_tokens: 469_000_000_000,
            },
            micro_batch: 1,
            seed: 0,
            optimizer: AdamW {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                no_decay: vec![ParamGroup::Norms],
            },
            grad_clip: 1.0,
            lr: vec![
                LrPhase {
                    shape: LrShape::Linear,
                    end: Some(PhaseEnd::For(Position::Steps(2000))),
                    to: 2.2e-4,
                },
                LrPhase {
                    shape: LrShape::Constant,
                    end: Some(PhaseEnd::Until(Position::Tokens(10_000_000_000_000))),
                    to: 2.2e-4,
                },
                LrPhase {
                    shape: LrShape::Cosine,
                    end: Some(PhaseEnd::For(Position::Tokens(4_300_000_000_000))),
                    to: 2.2e-5,
                },
                LrPhase {
                    shape: LrShape::Constant,
                    end: Some(PhaseEnd::For(Position::Tokens(333_000_000_000))),
                    to: 2.2e-5,
                },
                LrPhase {
                    shape: LrShape::Constant,
                    end: None,
                    to: 7.3e-6,
                },
            ],
            lr_scale: Vec::new(),
            data: Data {
                sources: vec![Source::Files {
                    path: "data/pretrain".into(),
                    weight: 1.0,
                }],
                packing: true,
                fim_rate: 0.1,
            },
            extend: vec![
                ExtendPhase {
                    seq_len: 32_768,
                    batch: 1920,
                    lr: 7.3e-6,
                    steps: 1000,
                },
                ExtendPhase {
                    seq_len: 131_072,
                    batch: 480,
                    lr: 7.3e-6,
                    steps: 1000,
                },
            ],
        },
        precision: Precision {
            gemm: Dtype::E4m3,
            activation_tile: [1, 128],
            weight_block: [128, 128],
            promotion_interval: 128,
            high_precision: vec![
                HighPrecisionOp::Embedding,
                HighPrecisionOp::Head,
                HighPrecisionOp::Gating,
                HighPrecisionOp::Norms,
                HighPrecisionOp::Attention,
            ],
            master_weights: Dtype::F32,
            grads: Dtype::F32,
            adam_moments: Dtype::Bf16,
            saved_activations: Dtype::E4m3,
            dispatch: Dtype::E4m3,
            combine: Dtype::Bf16,
            recompute: vec![Recompute::Rmsnorm, Recompute::MlaUpProj, Recompute::Swiglu],
            ema: Some(Ema { decay: 0.999 }),
        },
        parallel: Parallel {
            nodes: 256,
            gpus_per_node: 8,
            gpu: Gpu {
                name: "h800".into(),
                memory_bytes: 80 << 30,
                sms: 132,
            },
            pipeline: Pipeline {
                schedule: PipelineSchedule::Dualpipe,
                stages: 16,
                layout: Vec::new(),
            },
            expert: ExpertParallel {
                size: 64,
                max_nodes: 4,
            },
            data: DataParallel { size: 128, zero: 1 },
            comm_sms: 20,
        },
    }
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
    model.ffn = vec![FfnRange {
        layers: LayerRange { start: 0, end: 1 },
        ffn: Ffn::Dense { intermediate: 5 },
    }];
    model.mtp = None;
    spec.train.seq_len = 3;
    spec.train.batch = Batch::Constant { sequences: 2 };
    spec.parallel = Parallel {
        nodes: 1,
        gpus_per_node: 1,
        gpu: Gpu {
            name: "cpu".into(),
            memory_bytes: 1 << 20,
            sms: 1,
        },
        pipeline: Pipeline {
            schedule: PipelineSchedule::OneFOneB,
            stages: 1,
            layout: Vec::new(),
        },
        expert: ExpertParallel {
            size: 1,
            max_nodes: 1,
        },
        data: DataParallel { size: 1, zero: 0 },
        comm_sms: 0,
    };
    spec
}

/// [`tiny_dense`] with an MoE FFN: 1 shared + 4 routed experts of intermediate 2, top 2.
pub fn tiny_moe() -> Spec {
    let mut spec = tiny_dense();
    let Ffn::Moe(moe) = deepseek_v3().model.ffn[1].ffn.clone() else {
        unreachable!()
    };
    spec.model.ffn[0].ffn = Ffn::Moe(Moe {
        routed_experts: 4,
        top_k: 2,
        intermediate: 2,
        groups: 2,
        keep_groups: 1,
        ..moe
    });
    spec
}
