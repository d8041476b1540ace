use anyhow::Result;
#[derive(clap::Args, Debug)]
pub struct WanBenchArgs {}
pub fn wan(_a: WanBenchArgs) -> Result<()> { Ok(()) }
