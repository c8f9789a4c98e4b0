"""GTSRB's 43 classes: names, and the sign category each belongs to (used by the synthetic generator)."""

from __future__ import annotations

GTSRB_CLASS_NAMES: tuple[str, ...] = (
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)

NUM_GTSRB_CLASSES = len(GTSRB_CLASS_NAMES)

# The sign family of each class: shape and colours follow from it.
PROHIBITORY = "prohibitory"  # white disc, red ring
DANGER = "danger"  # white triangle pointing up, red border
MANDATORY = "mandatory"  # blue disc, white symbol
END = "end"  # white disc, grey ring, dark diagonal bars
PRIORITY = "priority"  # yellow diamond in a white border
YIELD = "yield"  # white triangle pointing down, red border
STOP = "stop"  # red octagon
NO_ENTRY = "no_entry"  # red disc, white bar

CLASS_CATEGORY: tuple[str, ...] = tuple(
    {6: END, 32: END, 41: END, 42: END, 12: PRIORITY, 13: YIELD, 14: STOP, 17: NO_ENTRY}.get(
        i, PROHIBITORY if i <= 16 and i != 11 else DANGER if i == 11 or 18 <= i <= 31 else MANDATORY
    )
    for i in range(NUM_GTSRB_CLASSES)
)
