//! The samplers replay diffusers' loops (tests/fixtures/schedulers.safetensors,
//! scripts/fixtures/make_schedulers.py): same timesteps, same initial noise
//! scale, same final sample for a fixed stand-in denoiser.

use ragar_core::schedulers::{build, ScheduleConfig, SchedulerKind};

fn tensor(st: &safetensors::SafeTensors, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("no {name}"));
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        d => panic!("{name}: {d:?}"),
    }
}

#[test]
fn ddim_euler_ancestral_and_dpm_solver_match_diffusers() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/schedulers.safetensors"
    ))
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("euler_a", SchedulerKind::EulerAncestral),
        ("dpmpp", SchedulerKind::DpmSolverPP),
    ] {
        let mut s = build(kind, &ScheduleConfig::default(), 10).unwrap();
        assert_eq!(
            s.timesteps(),
            tensor(&st, &format!("{name}.timesteps")).as_slice(),
            "{name} timesteps"
        );
        let sigma = tensor(&st, &format!("{name}.init_noise_sigma"))[0];
        assert!(
            (s.init_noise_sigma() - sigma).abs() <= 1e-5 * sigma,
            "{name} initial noise sigma {} vs {sigma}",
            s.init_noise_sigma()
        );
        let mut x: Vec<f32> = tensor(&st, &format!("{name}.init")).iter().map(|&v| v as f32).collect();
        let noises = s.needs_noise().then(|| tensor(&st, &format!("{name}.noises")));
        let n = x.len();
        for i in 0..s.timesteps().len() {
            let t = s.timesteps()[i];
            let eps: Vec<f32> = s
                .scale_model_input(&x, i)
                .iter()
                .map(|&v| (0.1 * v as f64 + 0.001 * t) as f32)
                .collect();
            let z: Option<Vec<f32>> = noises
                .as_ref()
                .map(|all| all[i * n..(i + 1) * n].iter().map(|&v| v as f32).collect());
            x = s.step(&eps, i, &x, z.as_deref()).unwrap();
        }
        let want = tensor(&st, &format!("{name}.final"));
        let diff = x
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        eprintln!("{name}: max |diff| {diff:.2e} (max |x| {scale:.2})");
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max |diff| {diff}");
    }
}

#[test]
fn bad_inputs_are_errors() {
    assert!(build(SchedulerKind::Ddim, &ScheduleConfig::default(), 0).is_err());
    assert!(SchedulerKind::parse("plms").is_err());
    let mut s = build(SchedulerKind::EulerAncestral, &ScheduleConfig::default(), 4).unwrap();
    assert!(s.step(&[0.0; 4], 0, &[0.0; 4], None).is_err(), "euler-a without noise");
    assert!(
        s.step(&[0.0; 3], 0, &[0.0; 4], Some(&[0.0; 4])).is_err(),
        "length mismatch"
    );
}
