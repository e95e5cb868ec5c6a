"""From video files to I3D features: the network (`i3d`), frames and optical flow (`frames`), windows and
batching (`extract`). PyAV and OpenCV are needed only by `frames` (`pip install cltdr-jax[video]`)."""
