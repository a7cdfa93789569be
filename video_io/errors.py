"""Exceptions raised by video_io; every message names the path or URL and what to do next."""


class VideoError(Exception):
    """Base class: anything that stops a video from being read."""


class VideoNotFoundError(VideoError):
    """The path does not exist."""


class NotAVideoError(VideoError):
    """The file exists but no demuxer recognises it as a media container."""


class NoVideoStreamError(VideoError):
    """The container opens but holds no video stream (e.g. an audio-only file)."""


class NoFramesError(VideoError):
    """The video stream holds no decodable frames."""


class UnreadableStreamError(VideoError):
    """A URL or live stream cannot be opened, or broke off while being read."""
