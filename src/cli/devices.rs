//! `vkdecode devices`: every Vulkan 1.2+ device with a compute queue, and what it offers.

use clap::Args;
use vkdecode::gpu::{Context, ContextOptions, DeviceInfo, list_devices};

use super::table::{Align, Table, bytes, yes_no};
use super::{Finish, Global, emit, note};

#[derive(Args)]
pub struct DevicesArgs {
    /// Print a JSON array of device descriptions instead of the table
    #[arg(long)]
    json: bool,
}

pub fn run(global: &Global, args: &DevicesArgs) -> anyhow::Result<Finish> {
    let devices = list_devices().map_err(|e| anyhow::anyhow!("cannot list Vulkan devices: {e}"))?;
    if args.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&devices)?))?;
        return Ok(Finish::AllAsExpected);
    }
    if devices.is_empty() {
        anyhow::bail!("no Vulkan 1.2 device with a compute queue was found (is a driver installed?)");
    }
    let selected = selected_index(global);
    emit(&render(&devices, selected))?;
    Ok(Finish::AllAsExpected)
}

/// The device the other commands would open, found by opening it (the selection logic stays in
/// one place); `None`, with a note, when there is none.
fn selected_index(global: &Global) -> Option<usize> {
    let options = ContextOptions { validation: false, ..global.context_options() };
    let opened = global.preflight(&options).and_then(|_| Context::new(&options).map_err(anyhow::Error::from));
    match opened {
        Ok(ctx) => Some(ctx.info().index),
        Err(e) => {
            note(&format!("note: no device is selected: {e}"));
            None
        }
    }
}

fn render(devices: &[DeviceInfo], selected: Option<usize>) -> String {
    let mut table = Table::new(&[
        ("", Align::Left),
        ("#", Align::Right),
        ("name", Align::Left),
        ("type", Align::Left),
        ("driver", Align::Left),
        ("API", Align::Left),
        ("subgroup", Align::Right),
        ("compute units", Align::Right),
        ("16-bit storage", Align::Left),
        ("float16", Align::Left),
        ("int16", Align::Left),
        ("max storage buffer", Align::Right),
        ("shared memory", Align::Right),
        ("timestamp period", Align::Right),
    ]);
    for d in devices {
        let timestamp =
            if d.timestamp_valid_bits == 0 { "none".to_string() } else { format!("{} ns", d.timestamp_period_ns) };
        table.row(vec![
            if selected == Some(d.index) { "*" } else { "" }.to_string(),
            d.index.to_string(),
            d.name.clone(),
            d.device_type.clone(),
            format!("{} {}", d.driver_name, d.driver_info).trim().to_string(),
            d.api_version.clone(),
            d.subgroup_size.to_string(),
            d.compute_units.map_or("-".to_string(), |n| n.to_string()),
            yes_no(d.storage_buffer_16bit),
            yes_no(d.shader_float16),
            yes_no(d.shader_int16),
            bytes(d.max_storage_buffer_range),
            bytes(u64::from(d.max_compute_shared_memory)),
            timestamp,
        ]);
    }
    let mut out = table.render();
    out.push_str(
        "\n* the device `check` and `replay` use: --device or VKDECODE_DEVICE (index or name substring), \
         else the best by type (discrete < integrated < virtual GPU < CPU)\n",
    );
    out
}
