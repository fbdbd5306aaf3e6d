"""Small helpers every layer may use: strict JSON and atomic files (`jsonio`), input devices (`devices`)."""
