// The demo's screen: users and their history, a text's preference heatmap,
// "personalize now" with a progress bar and a cancel button, and generic next
// to personalized text.
package org.nextquill.demo.ui

import androidx.compose.foundation.background
import androidx.compose.foundation.border
import androidx.compose.foundation.clickable
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.ExperimentalLayoutApi
import androidx.compose.foundation.layout.FlowRow
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.FilterChip
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.Color
import androidx.compose.ui.unit.dp
import org.nextquill.demo.DemoViewModel
import org.nextquill.demo.core.Heatmap

@Composable
fun DemoScreen(model: DemoViewModel) {
    LazyColumn(Modifier.fillMaxSize().padding(16.dp), verticalArrangement = Arrangement.spacedBy(12.dp)) {
        item { Text(model.status) }
        item {
            Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                model.users.forEach { user ->
                    FilterChip(
                        selected = model.selectedUser == user.userId,
                        onClick = { model.select(user.userId) },
                        label = { Text("${user.userId} (${user.items})") },
                    )
                }
            }
        }
        model.heatmap?.let { item { HeatmapCard(it) } }
        if (model.selectedUser != null) {
            item { PersonalizeCard(model) }
            item { CompareCard(model) }
            item { Text("History — tap a text for its heatmap") }
            items(model.history) { item ->
                Card(Modifier.fillMaxWidth().clickable { model.explain(item) }) {
                    Column(Modifier.padding(12.dp)) {
                        Text(item.request.lines().joinToString(" · "))
                        Text(item.text)
                    }
                }
            }
        }
    }
}

/** Each token tinted by Δp: orange where the history made it likelier, blue where less. */
@OptIn(ExperimentalLayoutApi::class)
@Composable
fun HeatmapCard(heatmap: Heatmap) {
    Card(Modifier.fillMaxWidth()) {
        FlowRow(Modifier.padding(12.dp)) {
            heatmap.cells.forEach { cell ->
                val tint = if (cell.intensity >= 0) Color(0xFFFF8A00) else Color(0xFF2F6BFF)
                val alpha = kotlin.math.abs(cell.intensity) * 0.8f
                var modifier = Modifier.background(tint.copy(alpha = alpha))
                if (cell.preferenceBearing) modifier = modifier.border(1.dp, Color.Black)
                Text(cell.text, modifier)
            }
        }
    }
}

@Composable
fun PersonalizeCard(model: DemoViewModel) {
    Card(Modifier.fillMaxWidth()) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(8.dp)) {
            if (model.isTraining) {
                val progress = model.training
                LinearProgressIndicator(progress = { progress?.fraction ?: 0f }, Modifier.fillMaxWidth())
                Text(
                    progress?.let { "step ${it.step}/${it.totalSteps}, loss %.3f, about %.0f s left".format(it.loss, it.etaSeconds) }
                        ?: "preparing…",
                )
                OutlinedButton(onClick = model::cancel) { Text("Cancel") }
            } else {
                Button(onClick = model::personalize) { Text("Personalize now") }
            }
        }
    }
}

@Composable
fun CompareCard(model: DemoViewModel) {
    Card(Modifier.fillMaxWidth()) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(8.dp)) {
            Button(onClick = model::compare) { Text("Write a kettle review") }
            Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                Column(Modifier.weight(1f)) {
                    Text("Generic")
                    Text(model.genericText)
                }
                Column(Modifier.weight(1f)) {
                    Text("Personalized")
                    Text(model.personalText)
                }
            }
        }
    }
}
