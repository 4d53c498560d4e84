"""Code every package may import: config machinery, exit codes, mp4 writing. Imports nothing of ours."""
