"""Audio input: PCM helpers, webrtcvad utterance segmentation and openSMILE features."""
