//! Fuzz-chosen chunking shared by the stream targets: each cut byte picks a position
//! (`byte × len / 255`), in order. Included with `#[path = "common/cuts.rs"] mod cuts;`.

/// `body` cut where `cut_bytes` say: the chunks a reader would get from the network.
pub fn pieces<'a>(body: &'a [u8], cut_bytes: &[u8]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .map(|c| usize::from(*c) * body.len() / 255)
        .collect();
    cuts.sort_unstable();
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for c in cuts {
        chunks.push(&body[start..c]);
        start = c;
    }
    chunks.push(&body[start..]);
    chunks
}
