"""Code every package may import: config machinery, exit codes, mp4 writing, caption defaults. Imports nothing of ours."""
