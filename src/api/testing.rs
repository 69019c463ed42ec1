//! Test helpers shared by the stream readers' tests.

/// `bytes` cut at `cuts` (each taken modulo `len + 1`, in order): the chunks a reader would get.
pub(crate) fn split_at_cuts<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for c in cuts {
        chunks.push(&bytes[start..c]);
        start = c;
    }
    chunks.push(&bytes[start..]);
    chunks
}
