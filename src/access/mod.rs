//! Who asks, and may they: client authentication on the pull API (htpasswd, token files,
//! client certificates) and the `[[access]]` rules.
