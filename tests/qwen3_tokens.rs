mod common;

use common::golden::{FIXTURES, Golden};
use vkdecode::engine::{Engine, GenerateOptions};
use vkdecode::gpu::Context;
use vkdecode::model::Checkpoint;

#[test]
fn smoke() {
    let ctx = Context::shared().unwrap();
    for name in FIXTURES {
        let g = Golden::load(name);
        let ck = Checkpoint::open(&g.dir).unwrap();
        let engine = Engine::from_checkpoint(&ctx, &ck, |_, _| {}).unwrap();
        let out = engine.generate(&g.prompt, g.generated.len(), &GenerateOptions::default(), |_| {}).unwrap();
        println!("{name}: {:?}\n   vs {:?}\n counters {:?}", out.generated_ids, g.generated, out.counters);
        let logits = engine.teacher_forced_logits(&g.all_ids(), &GenerateOptions::default()).unwrap();
        println!("err {:?}", g.logit_error(&logits));
    }
}
