"""Small helpers every layer may use: strict JSON and atomic files (`jsonio`), input devices (`devices`), the
removal of temporary files that killed writes left (`tempfiles`), memory estimates for caches (`sizes`)."""
