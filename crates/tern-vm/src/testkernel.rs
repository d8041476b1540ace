//! A bootable test guest in a few dozen bytes.
//!
//! Tests of the VM lifecycle and of migration need a guest that boots under
//! `qemu-system-x86_64 -kernel` in well under a second, and the real guest (kernel +
//! initrd) may not be built on the machine. This is a multiboot (v1) image in the
//! "a.out kludge" form: a flat binary whose header gives its load address, so QEMU's own
//! multiboot loader runs it in 32-bit protected mode. It writes a message to COM1
//! (port 0x3f8; QEMU's UART needs no setup to transmit) and then increments a counter in
//! RAM forever, so the guest keeps running (and keeps dirtying a page) — a live target
//! for `query-status`, `stop`/`cont` and migration.
//!
//! Memory map: loaded at [`LOAD_ADDR`] (1 MiB), entry right after the 32-byte header,
//! the message after the code, the counter at [`COUNTER_ADDR`].

/// Physical address the image is loaded at.
pub const LOAD_ADDR: u32 = 0x0010_0000;
/// Physical address of the 32-bit counter the guest increments.
pub const COUNTER_ADDR: u32 = 0x0020_0000;
/// Longest message accepted (bytes).
pub const MAX_MESSAGE_BYTES: usize = 1024;

const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Bit 16: the header's address fields are valid (a.out kludge; no ELF needed).
const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;
const HEADER_BYTES: u32 = 32;

/// The image: prints `message` (NUL bytes are not allowed) on the serial port, then loops.
pub fn multiboot_image(message: &str) -> Vec<u8> {
    assert!(message.len() <= MAX_MESSAGE_BYTES, "message too long");
    assert!(!message.contains('\0'), "message contains NUL");
    let entry = LOAD_ADDR + HEADER_BYTES;
    let mut code: Vec<u8> = Vec::new();
    // mov edx, 0x3f8
    code.extend([0xba, 0xf8, 0x03, 0x00, 0x00]);
    // mov esi, <message address>; patched below once the code length is known.
    code.push(0xbe);
    let msg_addr_at = code.len();
    code.extend([0; 4]);
    // next: lodsb; test al, al; jz done; out dx, al; jmp next
    code.extend([0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
    // done: inc dword [COUNTER_ADDR]; jmp done
    code.extend([0xff, 0x05]);
    code.extend(COUNTER_ADDR.to_le_bytes());
    code.extend([0xeb, 0xf8]);
    let msg_addr = entry + code.len() as u32;
    code[msg_addr_at..msg_addr_at + 4].copy_from_slice(&msg_addr.to_le_bytes());

    let flags = MULTIBOOT_AOUT_KLUDGE;
    let header = [
        MULTIBOOT_MAGIC,
        flags,
        0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(flags)),
        LOAD_ADDR, // header_addr: the header is the first thing in the image
        LOAD_ADDR, // load_addr
        0,         // load_end_addr: 0 = the whole file
        0,         // bss_end_addr: no bss
        entry,
    ];
    let mut image: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    image.extend(code);
    image.extend(message.as_bytes());
    image.push(0);
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checksums_and_addresses_are_consistent() {
        let img = multiboot_image("hello\n");
        let word = |i: usize| u32::from_le_bytes(img[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), MULTIBOOT_MAGIC);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        assert_eq!(word(7), LOAD_ADDR + HEADER_BYTES);
        // The `mov esi` operand points at the message in the loaded image.
        let msg_addr = u32::from_le_bytes(img[38..42].try_into().unwrap());
        let at = (msg_addr - LOAD_ADDR) as usize;
        assert_eq!(&img[at..], b"hello\n\0");
        // Both jumps land on instruction starts: `jmp next` on lodsb, `jmp done` on inc.
        assert_eq!(img[42], 0xac);
        assert_eq!(img[48..50], [0xeb, 0xf8]);
        assert_eq!(img[50..52], [0xff, 0x05]);
        assert_eq!(img[56..58], [0xeb, 0xf8]);
    }
}
