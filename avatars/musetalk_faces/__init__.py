"""MuseTalk v1.5's face models and preprocessing, written for lipstream: S3FD detection, DWPose
landmarks, BiSeNet parsing, and the boxes and blend masks MuseTalk derives from them."""
